"""The default split is stable as the data grows: a lesion (an image without a lesion id) keeps
its split in every later version of the dataset; the report compares with an earlier split
(`--previous`), and a relabelled image kept from it stops the split until accepted."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from components import split
from components.common.labels import CLASSES
from tests.conftest import SHARED_DATA

HAM = SHARED_DATA / "ham10000-200x150"


def _synthetic_twin(n_lesions: int = 7470, seed: int = 0) -> pd.DataFrame:
    """HAM10000's shape without its files: its class shares, about 10,000 images in lesions
    of 1-4 images."""
    rng = np.random.default_rng(seed)
    shares = np.array([1113, 6703, 514, 130, 1099, 115, 142, 197]) / 10013
    per_lesion = rng.choice([1, 2, 3, 4], n_lesions, p=[0.75, 0.17, 0.06, 0.02])
    classes = rng.choice(len(CLASSES), n_lesions, p=shares)
    lesion = np.repeat(np.arange(n_lesions), per_lesion)
    return pd.DataFrame({"image": [f"IMG_{k:06d}" for k in range(len(lesion))],
                         "label": classes[lesion], "lesion_id": [f"L{k:05d}" for k in lesion]})


@pytest.fixture(scope="module")
def ham() -> pd.DataFrame:
    """image,label,lesion_id of HAM10000 (real when ../shared/data is there, else a twin)."""
    if not (HAM / "labels.csv").is_file():
        return _synthetic_twin()
    labels = pd.read_csv(HAM / "labels.csv")
    meta = pd.read_csv(HAM / "ham10000_metadata.csv", usecols=["image", "lesion_id"])
    table = labels.assign(label=labels[list(CLASSES)].to_numpy().argmax(axis=1))
    return table[["image", "label"]].merge(meta, on="image", how="left")


def _write(table: pd.DataFrame, folder) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    table[["image", "label"]].to_csv(folder / "labels.csv", index=False)
    table[["image", "lesion_id"]].to_csv(folder / "metadata.csv", index=False)
    return ["--labels", str(folder / "labels.csv"), "--metadata", str(folder / "metadata.csv")]


def _split(table: pd.DataFrame, folder, out, **settings) -> dict:
    """split.run on the table written into folder."""
    args = _write(table, folder)
    return split.run(args[1], out, metadata=args[3], **settings)


def _split_of(out) -> pd.Series:
    return pd.concat(pd.read_csv(out / f"{name}.csv", dtype=str).assign(split=name)
                     for name in split.SPLITS).set_index("image")["split"]


def test_adding_1000_ham10000_images_moves_no_lesion(ham, tmp_path, capsys):
    rng = np.random.default_rng(1)
    added = rng.choice(len(ham), 1000, replace=False)
    v1, v2 = ham.drop(index=added), ham
    assert split.main([*_write(v1, tmp_path / "v1"), "--out", str(tmp_path / "s1")]) == 0
    capsys.readouterr()
    assert split.main([*_write(v2, tmp_path / "v2"), "--out", str(tmp_path / "s2"),
                       "--previous", str(tmp_path / "s1")]) == 0
    printed = json.loads(capsys.readouterr().out)
    before, after = _split_of(tmp_path / "s1"), _split_of(tmp_path / "s2")
    assert (after[before.index] == before).all()  # every image of version 1 kept its split
    lesions = v2.set_index("image").loc[after.index, "lesion_id"].fillna(pd.Series(after.index, after.index))
    assert (pd.DataFrame({"l": lesions, "s": after}).groupby("l")["s"].nunique() == 1).all()
    report = json.loads((tmp_path / "s2" / "split_report.json").read_text())
    change = report["previous"]
    assert change["images"] == {"new": 1000, "kept": len(v1), "removed": 0}
    assert change["moved"] == {"images": 0, "groups": 0} and change["relabelled"] == []
    new_groups = len(set(v2["lesion_id"].fillna(v2["image"]))) - len(set(v1["lesion_id"].fillna(v1["image"])))
    assert change["groups"]["new"] == new_groups and change["groups"]["removed"] == 0
    assert printed["previous"] == change


def test_removing_images_moves_no_other_group(ham, tmp_path):
    small = ham.iloc[:3000]
    _split(small, tmp_path / "a", tmp_path / "s1")
    fewer = small.iloc[::2]
    report = _split(fewer, tmp_path / "b", tmp_path / "s2",
                       previous=tmp_path / "s1")
    before, after = _split_of(tmp_path / "s1"), _split_of(tmp_path / "s2")
    assert (before[after.index] == after).all()
    assert report["previous"]["images"] == {"new": 0, "kept": 1500, "removed": 1500}


def test_class_shares_within_2_points_on_ham10000(shared_data, ham, tmp_path):
    report = _split(ham, tmp_path / "d", tmp_path / "s")
    overall = np.bincount(ham["label"], minlength=len(CLASSES)) / len(ham)
    for name, counts in report["counts"].items():
        share = np.array([counts[c] for c in CLASSES]) / report["sizes"][name]
        assert np.abs(share - overall).max() <= 0.02, (name, share - overall)
    assert report["max_class_share_deviation_pp"] <= 2.0


def test_a_relabelled_kept_image_stops_the_split_in_one_line_naming_it(ham, tmp_path, capsys):
    small = ham.iloc[:2000].reset_index(drop=True)
    _split(small, tmp_path / "a", tmp_path / "s1")
    relabelled = small.copy()
    image = relabelled.loc[17, "image"]
    relabelled.loc[17, "label"] = (relabelled.loc[17, "label"] + 1) % len(CLASSES)
    args = [*_write(relabelled, tmp_path / "b"), "--out", str(tmp_path / "s2"),
            "--previous", str(tmp_path / "s1")]
    assert split.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("split: ") and "\n" not in err and image in err, err
    assert "--accept_relabel" in err and not (tmp_path / "s2").exists()
    assert split.main([*args, "--accept_relabel"]) == 0
    report = json.loads((tmp_path / "s2" / "split_report.json").read_text())
    assert report["previous"]["relabelled"] == [image]


def test_the_split_is_a_function_of_each_group_alone(tmp_path):
    """Stateless: the same image gets the same split in any dataset that holds it, so DVC,
    KFP and the CLI agree with no earlier split to read."""
    a = pd.DataFrame({"image": [f"i{k}" for k in range(600)], "label": [k % 8 for k in range(600)],
                      "lesion_id": [f"L{k // 2}" for k in range(600)]})
    _split(a, tmp_path / "a", tmp_path / "sa")
    _split(a.iloc[200:], tmp_path / "b", tmp_path / "sb", seed=0)
    both = _split_of(tmp_path / "sb")
    assert (_split_of(tmp_path / "sa")[both.index] == both).all()
    _split(a, tmp_path / "c", tmp_path / "sc", seed=1)
    other_seed = _split_of(tmp_path / "sc")
    assert (other_seed != _split_of(tmp_path / "sa")[other_seed.index]).any()


def test_a_previous_folder_without_a_split_is_a_first_split(ham, tmp_path):
    """A fresh clone has data/splits/ (DVC's .gitignore, the uncached report) but not the
    CSVs until `dvc pull`: nothing to compare with. One CSV of three is an error."""
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / ".gitignore").write_text("/train.csv\n")
    report = _split(ham.iloc[:800], tmp_path / "a", tmp_path / "s2", previous=tmp_path / "s1")
    assert report["previous"] is None
    (tmp_path / "s2" / "val.csv").unlink()
    with pytest.raises(FileNotFoundError, match="val.csv"):
        _split(ham.iloc[:800], tmp_path / "a", tmp_path / "s3", previous=tmp_path / "s2")
