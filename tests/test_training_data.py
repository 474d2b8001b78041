"""A training run's inputs as one object (components/training/training_data.py): the data
version is the project's (never the working folder's), the data hash falls back to the
preprocess manifest then the split CSVs, lineage comes from the steps' reports, and the input
digest follows every input file that changes what a training computes."""
from __future__ import annotations

import hashlib
import json

import pytest

from components import train
from components.common import outputs
from components.training import run_record
from components.training.training_data import TrainingData
from tiny_data import dvc_project


@pytest.fixture
def files(tmp_path):
    """train/val CSVs, class weights and an images folder (the files need no real images)."""
    (tmp_path / "prepared" / "images").mkdir(parents=True)
    paths = {"img_dir": tmp_path / "prepared" / "images"}
    for name in ("train", "val", "test"):
        paths[f"{name}_csv"] = tmp_path / "splits" / f"{name}.csv"
        paths[f"{name}_csv"].parent.mkdir(exist_ok=True)
        paths[f"{name}_csv"].write_text(f"image,label\n{name}_1,0\n")
    paths["class_weights"] = tmp_path / "class_weights.json"
    paths["class_weights"].write_text("{}")
    return paths


def test_the_data_version_is_the_projects_not_the_working_folders(files, tmp_path,
                                                                   monkeypatch):
    rev = dvc_project(tmp_path / "project", "0123abcd")
    elsewhere = tmp_path / "elsewhere"
    dvc_project(elsewhere, "ffff0000")  # another project, where the process happens to run
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("DVC_ROOT", raising=False)

    data = TrainingData.read(**files, project=tmp_path / "project")
    assert (data.version.commit, data.version.dvc_hash, data.version.rev) == (
        rev, "0123abcd", rev)
    assert data.data_hash == "0123abcd"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "project"))  # as `dvc repro` sets it
    assert TrainingData.read(**files).version == data.version

    # data/raw.dvc edited after the commit: no git revision holds this data
    (tmp_path / "project" / "data" / "raw.dvc").write_text("outs:\n- md5: 4567cdef.dir\n")
    edited = TrainingData.read(**files)
    assert (edited.version.commit, edited.version.dvc_hash, edited.version.rev) == (
        rev, "4567cdef", None)
    assert run_record.data_rev(edited.version) == "uncommitted"
    assert "4567cdef, not committed" in run_record.data_version(edited)


def test_without_dvc_the_data_hash_is_the_manifests_else_the_split_csvs(files, tmp_path):
    project = tmp_path / "no-dvc"
    project.mkdir()
    manifest = files["img_dir"].parent / outputs.MANIFEST
    manifest.write_text("image,label,src_file\ntrain_1,0,a.jpg\n")
    data = TrainingData.read(**files, project=project)
    assert data.version.dvc_hash is None and data.version.rev is None
    assert run_record.data_rev(data.version) == "none"
    assert run_record.data_version(data).startswith("not versioned by DVC")
    assert data.data_hash == hashlib.md5(manifest.read_bytes()).hexdigest()

    manifest.unlink()
    csvs = files["train_csv"].read_bytes() + files["val_csv"].read_bytes()
    assert TrainingData.read(**files, project=project).data_hash == \
        hashlib.md5(csvs).hexdigest()
    no_val = TrainingData.read(**{**files, "val_csv": None}, project=project)
    assert no_val.data_hash == hashlib.md5(files["train_csv"].read_bytes()).hexdigest()


def test_lineage_comes_from_the_split_and_preprocess_reports(files, tmp_path):
    (files["train_csv"].parent / outputs.SPLIT_REPORT).write_text(
        json.dumps({"mode": "grouped", "split_hash": "s" * 64}))
    (files["img_dir"].parent / outputs.PREPROCESS_REPORT).write_text(
        json.dumps({"size": 64, "color_constancy": "shades_of_gray", "counts": {"corrupt": 2}}))
    data = TrainingData.read(**files, project=tmp_path)
    assert data.lineage == {"split_mode": "grouped", "split_hash": "s" * 64,
                            "prepare_size": 64, "color_constancy": "shades_of_gray",
                            "minkowski_p": 6.0, "preprocess_corrupt": 2}
    assert data.params()["train_csv"] == str(files["train_csv"])
    assert data.params()["val_csv"] == str(files["val_csv"])


def test_the_input_digest_follows_every_file_a_training_depends_on(files, tmp_path):
    def digest(**changes):
        return TrainingData.read(**{**files, **changes}, project=tmp_path).input_digest

    before = digest()
    assert digest() == before
    assert digest(test_csv=None) == before  # the test split changes no weight
    assert digest(val_csv=None) != before and digest(class_weights=None) != before
    files["class_weights"].write_text('{"weights": [1]}')
    assert digest() != before
    after_weights = digest()
    (files["img_dir"].parent / outputs.PREPROCESS_REPORT).write_text('{"size": 64}')
    assert digest() != after_weights


@pytest.mark.parametrize("broken", ["split report", "preprocess report", "dvc file"])
def test_an_unreadable_report_stops_the_training_in_one_line_naming_it(files, tmp_path,
                                                                        monkeypatch, capsys,
                                                                        broken):
    project = tmp_path / "project"
    dvc_project(project, "0123abcd")
    monkeypatch.setenv("DVC_ROOT", str(project))
    path = {"split report": files["train_csv"].parent / outputs.SPLIT_REPORT,
            "preprocess report": files["img_dir"].parent / outputs.PREPROCESS_REPORT,
            "dvc file": project / outputs.RAW_DATA_DVC}[broken]
    path.write_text('{"mode": "grouped", [secret')
    out = tmp_path / "out"
    assert train.main(["--train_csv", str(files["train_csv"]), "--img_dir",
                       str(files["img_dir"]), "--out_dir", str(out), "--no_mlflow"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"train: {path}: ") and err.count("\n") == 1
    assert "secret" not in err and not out.exists()
