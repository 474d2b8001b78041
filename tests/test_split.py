"""split: lesion-grouped, paper (image-level) and source (cross-site) splits, their report,
determinism, real ISIC 2019 checks."""
from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest

from components import split

from components.commands import synth
from components.common.labels import CLASSES


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synth.run(out, n=400, seed=0)
    return out


def read_splits(out):
    return {name: pd.read_csv(out / f"{name}.csv", dtype={"lesion_id": str}) for name in split.SPLITS}


@pytest.mark.parametrize("mode", ["grouped", "folds"])
def test_grouped_split_keeps_lesions_together(synthetic, tmp_path, mode):
    """Both grouped modes; folds (stratified) also has every class in every split, which the
    hashed default leaves to chance on so few lesions (here one class misses the test split)."""
    report = split.run(synthetic / "labels.csv", tmp_path, metadata=synthetic / "metadata.csv",
                       mode=mode)
    parts = read_splits(tmp_path)
    assert all(list(df.columns) == ["image", "label", "lesion_id", "source"] for df in parts.values())
    lesions = {name: set(df["lesion_id"]) for name, df in parts.items()}
    assert not lesions["train"] & lesions["val"] and not lesions["train"] & lesions["test"]
    assert not lesions["val"] & lesions["test"]
    assert report["lesions_shared"] == {"train_val": 0, "train_test": 0, "val_test": 0}
    assert report["test_lesion_leakage"] == 0.0
    if mode == "folds":
        assert all(set(df["label"]) == set(range(len(CLASSES))) for df in parts.values())
        assert report["classes_missing"] == {"train": [], "val": [], "test": []}
    else:
        assert sum(map(len, report["classes_missing"].values())) <= 1
    assert sum(report["sizes"].values()) == 400
    assert report["sizes"]["test"] == pytest.approx(60, abs=12)
    assert report["counts"]["train"]["NV"] == (parts["train"]["label"] == CLASSES.index("NV")).sum()

    data = b"".join((tmp_path / f"{name}.csv").read_bytes() for name in split.SPLITS)
    assert report["split_hash"] == hashlib.sha256(data).hexdigest()
    assert json.loads((tmp_path / "split_report.json").read_text())["split_hash"] == report["split_hash"]


def test_deterministic_for_a_seed(synthetic, tmp_path):
    kwargs = dict(metadata=synthetic / "metadata.csv")
    first = split.run(synthetic / "labels.csv", tmp_path / "a", seed=1, **kwargs)["split_hash"]
    again = split.run(synthetic / "labels.csv", tmp_path / "b", seed=1, **kwargs)["split_hash"]
    other = split.run(synthetic / "labels.csv", tmp_path / "c", seed=2, **kwargs)["split_hash"]
    assert first == again != other


def test_paper_mode_is_image_level_70_15_15(synthetic, tmp_path):
    report = split.run(synthetic / "labels.csv", tmp_path, metadata=synthetic / "metadata.csv", mode="paper")
    assert report["sizes"] == {"train": 280, "val": 60, "test": 60}
    assert report["test_lesion_leakage"] > 0  # several images per lesion: some leak, as in the paper


def test_without_metadata_there_is_no_lesion_column(synthetic, tmp_path):
    report = split.run(synthetic / "labels.csv", tmp_path)
    assert list(pd.read_csv(tmp_path / "train.csv").columns) == ["image", "label"]
    assert "lesions_shared" not in report


@pytest.mark.parametrize("kwargs", [dict(mode="random"), dict(val_frac=0.5, test_frac=0.5),
                                    dict(test_frac=0), dict(mode="source")])
def test_bad_options(synthetic, tmp_path, kwargs):
    with pytest.raises(ValueError):
        split.run(synthetic / "labels.csv", tmp_path, **kwargs)


def test_fold_plan():
    assert split._fold_plan(0.15, 0.15) == (20, 3, 3)
    assert split._fold_plan(0.1, 0.2) == (10, 1, 2)


def test_cli(synthetic, tmp_path, capsys):
    assert split.main(["--labels", str(synthetic / "labels.csv"), "--metadata", str(synthetic / "metadata.csv"),
                       "--out", str(tmp_path), "--mode", "paper", "--seed", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["sizes"]["train"] == 280


@pytest.fixture(scope="module")
def isic(shared_data):
    meta = shared_data / "isic2019-meta"
    return meta / "ISIC_2019_Training_GroundTruth.csv", meta / "ISIC_2019_Training_Metadata.csv"


def test_shared_isic_grouped(isic, tmp_path):
    labels, metadata = isic
    report = split.run(labels, tmp_path, metadata=metadata)
    assert report["lesions_shared"] == {"train_val": 0, "train_test": 0, "val_test": 0}
    assert report["max_class_share_deviation_pp"] <= 1.5
    overall = pd.read_csv(labels).iloc[:, 1:9].mean()
    for name, df in read_splits(tmp_path).items():
        share = df["label"].value_counts(normalize=True).reindex(range(8), fill_value=0).to_numpy()
        assert abs(share - overall.to_numpy()).max() <= 0.015, name


def test_shared_isic_paper(isic, tmp_path):
    labels, metadata = isic
    report = split.run(labels, tmp_path, metadata=metadata, mode="paper")
    for name, expected in zip(split.SPLITS, (17731, 3799, 3801)):
        assert abs(report["sizes"][name] - expected) <= 2, name
    assert 0.50 <= report["test_lesion_leakage"] <= 0.66
    assert report["lesions_shared"]["train_test"] > 1000


def test_source_split_holds_out_whole_sources(tmp_path):
    """Two sources in a `source` metadata column; the test split is one of them, entire."""
    rows, meta = [], []
    for i in range(240):
        site = "SITE_A" if (i // 2) % 3 else "SITE_B"  # a lesion's two images: one site
        rows.append(f"img{i:03d},{i % len(CLASSES)}")
        meta.append(f"img{i:03d},L{i // 2},{site}")
    (tmp_path / "labels.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    (tmp_path / "meta.csv").write_text("image,lesion_id,source\n" + "\n".join(meta) + "\n")
    report = split.run(tmp_path / "labels.csv", tmp_path / "out", metadata=tmp_path / "meta.csv",
                       mode="source", test_sources=["SITE_B"], val_frac=0.2)
    parts = read_splits(tmp_path / "out")
    assert set(parts["test"]["source"]) == {"SITE_B"} and len(parts["test"]) == 80
    assert set(parts["train"]["source"]) == set(parts["val"]["source"]) == {"SITE_A"}
    assert report["sources"] == {"train": {"SITE_A": report["sizes"]["train"]},
                                 "val": {"SITE_A": report["sizes"]["val"]}, "test": {"SITE_B": 80}}
    assert report["lesions_shared"] == {"train_val": 0, "train_test": 0, "val_test": 0}
    assert report["test_sources"] == ["SITE_B"] and report["left_out_mixed_source_lesions"] == []
    (tmp_path / "bad.csv").write_text("image,lesion_id,source\n" + "\n".join(
        m if not m.startswith("img001,") else "img001,L0,SITE_A" for m in meta) + "\n")
    # a lesion imaged at both sites belongs to neither: left out of every split, and listed
    mixed = split.run(tmp_path / "labels.csv", tmp_path / "o3", metadata=tmp_path / "bad.csv",
                      mode="source", test_sources=["SITE_B"], val_frac=0.2)
    assert mixed["left_out_mixed_source_lesions"] == ["L0"]
    assert sum(mixed["sizes"].values()) == 238 and mixed["sizes"]["test"] == 78
    parts = read_splits(tmp_path / "o3")
    assert not {"img000", "img001"} & set(pd.concat(parts.values())["image"])
    with pytest.raises(ValueError, match=r"test sources \['SITE_C'\] are not in the data"):
        split.run(tmp_path / "labels.csv", tmp_path / "o2", metadata=tmp_path / "meta.csv",
                  mode="source", test_sources=["SITE_C"])


def test_shared_isic_source_split_by_lesion_prefix(isic, tmp_path, capsys):
    """The official metadata has no source column: the lesion id's prefix is the source."""
    labels, metadata = isic
    assert split.main(["--labels", str(labels), "--metadata", str(metadata), "--out",
                       str(tmp_path), "--mode", "source", "--test_sources", "BCN"]) == 0
    report = json.loads((tmp_path / "split_report.json").read_text())
    assert report["sources"]["test"] == {"BCN": 12413}
    rest = {**report["sources"]["train"]}
    for source, n in report["sources"]["val"].items():
        rest[source] = rest.get(source, 0) + n
    assert rest == {"HAM": 10015, "MSK4": 819, "unknown": 2084}
    assert report["lesions_shared"] == {"train_val": 0, "train_test": 0, "val_test": 0}
    assert 0.12 <= report["sizes"]["val"] / (report["sizes"]["train"] + report["sizes"]["val"]) <= 0.18


def _labels(folder, n: int, classes: int = len(CLASSES), lesion=None):
    """labels.csv of n images i0..i<n-1>, class k % classes (SCC for the last image when
    classes is 7), and metadata.csv with lesion(k) as lesion ids (when given)."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = [k % classes for k in range(n)]
    if classes < len(CLASSES):
        labels[-1] = len(CLASSES) - 1
    (folder / "labels.csv").write_text("image,label\n" + "".join(
        f"i{k},{label}\n" for k, label in enumerate(labels)))
    if lesion is not None:
        (folder / "metadata.csv").write_text("image,lesion_id\n" + "".join(
            f"i{k},{lesion(k)}\n" for k in range(n)))
    return ["--labels", str(folder / "labels.csv"), "--out", str(folder / "out")] + (
        ["--metadata", str(folder / "metadata.csv")] if lesion is not None else [])


@pytest.mark.parametrize("n, classes, lesion, mode, message", [
    (16, 8, lambda k: f"L{k}", "folds", "16 lesions (an image without a lesion id counts as "
                                        "one) cannot fill the 20 folds"),
    (400, 8, lambda k: f"L{k % 8}", "folds", "8 lesions"),
    (400, 8, lambda k: "L0", "grouped", "1 lesion (an image without a lesion id counts as one) "
                                        "left the "),
    (40, 8, None, "folds", "no class has 20 images"),
    (400, 7, lambda k: f"L{k}", "paper", "class SCC has a single image"),
    (16, 8, None, "paper", "16 images are too few"),
], ids=["one_lesion_per_image", "eight_lesions", "one_lesion", "small_classes",
        "single_image_class", "few_images"])
def test_data_too_small_to_split_is_one_line_naming_the_labels_file(tmp_path, capsys, n, classes,
                                                                     lesion, mode, message):
    args = _labels(tmp_path, n, classes, lesion)
    assert split.main([*args, "--mode", mode]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"split: {tmp_path / 'labels.csv'}: ") and "\n" not in err, err
    assert message in err
    for sklearn_text in ("n_splits", "least populated", "test_size"):
        assert sklearn_text not in err
    assert not (tmp_path / "out").exists()


def test_a_lesion_with_several_classes_is_reported_by_id(tmp_path, caplog):
    """Reported, not refused: the split keeps such a lesion whole and stays valid, and an
    archive labels images one by one (a lesion followed over time can change diagnosis);
    the report and a warning name the lesions so that a labelling error is seen."""
    _labels(tmp_path, 400, lesion=lambda k: "L0" if k < 3 else f"L{k}")
    report = split.run(tmp_path / "labels.csv", tmp_path / "out",
                       metadata=tmp_path / "metadata.csv")
    assert report["lesions_with_several_classes"] == {"L0": ["MEL", "NV", "BCC"]}
    saved = json.loads((tmp_path / "out" / "split_report.json").read_text())
    assert saved["lesions_with_several_classes"] == {"L0": ["MEL", "NV", "BCC"]}
    assert "1 lesion has images of several classes (L0)" in caplog.text


def test_a_class_the_test_set_leaves_one_image_of_is_named_in_one_line(tmp_path, capsys):
    """Paper mode, 7 classes of 2 images and one of 46: the test set's stratified share takes
    one image of some 2-image classes, and val's split of the rest cannot stratify them
    (scikit-learn's "least populated classes" with class numbers, before)."""
    (tmp_path / "labels.csv").write_text("image,label\n" + "".join(
        f"i{k},{min(k // 2, 7)}\n" for k in range(60)))
    assert split.main(["--labels", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "out"),
                       "--mode", "paper"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"split: {tmp_path / 'labels.csv'}: class ") and "\n" not in err, err
    assert "too few images for a stratified (paper) split" in err
    assert "least populated" not in err and not (tmp_path / "out").exists()
