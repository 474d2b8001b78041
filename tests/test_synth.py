"""synth: an ISIC-format dataset that reads, splits, preprocesses and is learnable; same seed, same bytes."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from components import split

from components.commands import synth
from components.common.labels import CLASSES, UNKNOWN, read_labels


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, synth.run(out, n=400, seed=0)


def test_layout_and_formats(dataset):
    out, result = dataset
    header = (out / "labels.csv").read_text().splitlines()[0]
    assert header == ",".join(["image", *CLASSES, UNKNOWN])  # the official column order
    meta = pd.read_csv(out / "metadata.csv")
    assert list(meta.columns) == ["image", "lesion_id", "age_approx", "anatom_site_general", "sex"]
    table = read_labels(out / "labels.csv", metadata=out / "metadata.csv", images_dir=out / "images")
    assert len(table) == 400 and table["lesion_id"].notna().all()
    assert table["lesion_id"].nunique() == result["lesions"] < 400  # several images per lesion
    assert (table.groupby("lesion_id")["label"].nunique() == 1).all()


def test_imbalanced_like_isic_with_every_class_present(dataset):
    counts = dataset[1]["counts"]
    assert sum(counts.values()) == 400
    assert max(counts, key=counts.get) == "NV"
    assert min(counts.values()) >= 20


def test_sizes_include_a_few_large_images(dataset):
    out, _ = dataset
    sizes = [Image.open(p).size for p in sorted((out / "images").iterdir())]
    assert sizes.count(synth.LARGE) == 4
    assert all(Image.open(p).mode == "RGB" for p in list((out / "images").iterdir())[:20])
    assert sum(s == (300, 225) for s in sizes) > 150


def test_deterministic_for_a_seed(tmp_path):
    def files(folder):
        return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    synth.run(tmp_path / "a", n=30, seed=5)
    synth.run(tmp_path / "b", n=30, seed=5)
    synth.run(tmp_path / "c", n=30, seed=6)
    assert files(tmp_path / "a") == files(tmp_path / "b") != files(tmp_path / "c")


def test_refuses_a_non_empty_folder_unless_forced(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        synth.run(tmp_path, n=16)
    synth.run(tmp_path, n=16, overwrite=True)
    assert (tmp_path / "keep.txt").read_text() == "mine"
    assert len(list((tmp_path / "images").iterdir())) == 16


def test_too_few_images(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        synth.run(tmp_path, n=5)


def _features(path):
    """Colour and texture statistics of the image centre: enough for a linear model."""
    with Image.open(path) as im:
        im.draft("RGB", (160, 120))
        pixels = np.asarray(im.convert("RGB").resize((64, 48)), dtype=np.float32) / 255
    centre = pixels[12:36, 16:48]
    grey = centre.mean(axis=2)
    texture = [np.abs(np.diff(grey, axis=0)).mean(), np.abs(np.diff(grey, axis=1)).mean(), grey.std()]
    return np.concatenate([centre.mean(axis=(0, 1)), centre.std(axis=(0, 1)), pixels.mean(axis=(0, 1)), texture])


def test_learnable_on_a_lesion_grouped_split(dataset, tmp_path):
    out, _ = dataset
    split.run(out / "labels.csv", tmp_path, metadata=out / "metadata.csv")
    train, test = (pd.read_csv(tmp_path / f"{name}.csv") for name in ("train", "test"))
    x_train, x_test = (np.stack([_features(out / "images" / f"{i}.jpg") for i in df["image"]]) for df in (train, test))
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x_train, train["label"])
    score = balanced_accuracy_score(test["label"], model.predict(x_test))
    assert score > 0.5, f"balanced accuracy {score:.2f} (chance {1 / len(CLASSES):.2f})"


def test_several_sources_with_their_colour_casts(tmp_path):
    from components.common.labels import read_labels, sources

    synth.run(tmp_path / "raw", n=160, seed=0, sources=2)
    table = read_labels(tmp_path / "raw" / "labels.csv", metadata=tmp_path / "raw" / "metadata.csv")
    site = sources(table)
    assert set(site) == {"SITEA", "SITEB"} and site.value_counts().min() >= 60
    for name in ("SITEA", "SITEB"):  # every class at every site
        assert set(table["label"][site == name]) == set(range(8))
    red_blue = {}
    for name in ("SITEA", "SITEB"):
        pixels = np.stack([np.asarray(Image.open(tmp_path / "raw" / "images" / f"{i}.jpg")
                                      .resize((64, 48))).mean(axis=(0, 1))
                           for i in table["image"][site == name][:20]])
        red_blue[name] = pixels[:, 0].mean() / pixels[:, 2].mean()
    assert red_blue["SITEB"] > 1.2 * red_blue["SITEA"]  # SITEB's dermoscope casts warm
