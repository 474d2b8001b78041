"""Bad label CSVs through the steps that read them, and the BOM/CRLF variants of every format.

test_labels.py proves the reader's messages (file and line) for each bad row, and
test_preprocess.py the bad images; this file adds what they leave out: the steps (preprocess,
split, train) stop on a bad CSV naming the file and line and leave no output behind, and the
integer and one-hot formats, like the official one, are accepted with a BOM and CRLF endings.
Commands that start several steps (`pipeline run-local`, `exp run`) stop on a bad data folder
or setting before the first step, in one line.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from components import preprocess, split, train
from components.common.labels import CLASSES, LabelError

ROOT = Path(__file__).resolve().parents[1]

HEADER = "image," + ",".join(CLASSES)


def one_hot(*hot: int) -> str:
    return ",".join("1" if i in hot else "0" for i in range(len(CLASSES)))


BAD = {  # name -> (CSV text, line named, message part)
    "unknown_class": ("image,label\na,NV\nb,XYZ\n", 3, "unknown class 'XYZ'"),
    "multi_hot": (f"{HEADER}\na,{one_hot(1)}\nb,{one_hot(0, 7)}\n", 3, "several classes"),
    "duplicate_id": ("image,label\na,0\nb,1\na,2\n", 4, "duplicate image id 'a'"),
}


def _images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (40, 30), (120, 60, 30)).save(folder / f"{name}.jpg")
    return folder


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("step", ["preprocess", "split"])
def test_a_bad_csv_stops_the_step_naming_file_and_line_and_leaves_no_output(tmp_path, step,
                                                                            case):
    text, line, match = BAD[case]
    csv = tmp_path / f"{case}.csv"
    csv.write_text(text)
    images = _images(tmp_path / "images", ["a", "b"])
    out = tmp_path / "out"
    with pytest.raises(LabelError, match=match) as err:
        if step == "preprocess":
            preprocess.run(csv, images, out, size=32, workers=1)
        else:
            split.run(csv, out, seed=0)
    assert str(csv) in str(err.value) and f"line {line}" in str(err.value)
    assert not out.exists()


@pytest.mark.parametrize("case", ["duplicate_id", "missing_image"])
def test_training_on_a_bad_csv_fails_cleanly_before_writing_anything(tmp_path, capsys, case):
    text, line, match = BAD.get(case, ("image,label\na,0\nghost,1\n", None, "ghost"))
    csv = tmp_path / "train.csv"
    csv.write_text(text)
    images = _images(tmp_path / "images", ["a", "b"])
    out = tmp_path / "out"
    assert train.main(["--train_csv", str(csv), "--img_dir", str(images), "--out_dir", str(out),
                       "--no-mlflow", "--epochs", "1", "--num_workers", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("train: ") and match in err
    assert (str(csv) in err and f"line {line}" in err) if line else str(images) in err
    assert not [p for p in out.iterdir() if not p.name.startswith(".")]  # only the lock file


@pytest.mark.parametrize("text", [
    "image,label\na,0\nb,NV\nc,7\n",
    f"{HEADER}\na,{one_hot(0)}\nb,{one_hot(1)}\nc,{one_hot(7)}\n",
], ids=["integer", "one_hot"])
def test_bom_and_crlf_csvs_are_accepted_by_preprocess(tmp_path, text):
    csv = tmp_path / "labels.csv"
    csv.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    images = _images(tmp_path / "images", ["a", "b", "c"])
    result = preprocess.run(csv, images, tmp_path / "out", size=32, workers=1)
    assert result["in_manifest"] == 3
    manifest = (tmp_path / "out" / "manifest.csv").read_text()
    assert "\ufeff" not in manifest and all(f"\n{n}," in manifest for n in "abc")


def test_two_files_for_one_image_id_are_an_error_naming_both(tmp_path):
    images = _images(tmp_path / "img", ["A", "B"])
    Image.new("RGB", (40, 30)).save(images / "A.png")
    (tmp_path / "labels.csv").write_text("image,label\nA,0\nB,1\n")
    with pytest.raises(LabelError, match=r"image 'A' has two files, A\.jpg and A\.png"):
        preprocess.run(tmp_path / "labels.csv", images, tmp_path / "out", size=32, workers=1)
    assert not (tmp_path / "out").exists()


def test_a_utf16_labels_file_is_named(tmp_path):
    (tmp_path / "labels.csv").write_text("image,label\na,0\n", encoding="utf-16")
    with pytest.raises(LabelError, match=r"labels\.csv: not UTF-8 text \(saved as UTF-16"):
        split.run(tmp_path / "labels.csv", tmp_path / "out")


def test_labels_matching_no_image_stop_preprocess(tmp_path, capsys):
    _images(tmp_path / "img", ["x", "y"])
    (tmp_path / "labels.csv").write_text("image,label\na,0\nb,1\n")
    assert preprocess.main(["--labels", str(tmp_path / "labels.csv"), "--images",
                            str(tmp_path / "img"), "--out", str(tmp_path / "out")]) == 1
    assert "none of its 2 images is in" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_full_disk_during_a_checkpoint_write_says_so(tmp_path):
    """A real full file system (tests/full_disk.py): the first checkpoint does not fit."""
    import sys

    from full_disk import on_small_tmpfs
    from tiny_data import TINY, make_splits

    data = make_splits(tmp_path / "data")
    out = tmp_path / "full"
    train_cmd = [sys.executable, "-m", "components.train", "--train_csv", str(data["train"]),
                 "--img_dir", str(data["img_dir"]), "--out_dir", str(out), *TINY,
                 "--batch_size", "8", "--epochs", "1", "--num_workers", "0", "--no_mlflow"]
    done = on_small_tmpfs(out, 64, f"exec {' '.join(train_cmd)}", timeout=300)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"no space left on the device writing {out}/checkpoint_last.pt" in done.stderr
    assert "Traceback" not in done.stderr and "inline_container" not in done.stderr


# -- a bad setting or data folder stops a multi-step command before its first step ----------
@pytest.mark.parametrize("case", ["missing", "empty", "no_images", "no_labels", "empty_labels"])
def test_run_local_names_a_bad_data_folder_before_starting_kfp(tmp_path, capsys, case):
    from pathlib import Path

    from components.commands.cli import main as skinlesion

    data = tmp_path / "raw"
    if case != "missing":
        data.mkdir()
    if case in ("no_images", "empty_labels"):
        (data / "images").mkdir()
        (data / "images" / "notes.txt").write_text("not an image")
    if case == "no_labels":
        _images(data / "images", ["a"])
    if case == "empty_labels":
        (data / "labels.csv").write_text("")
    params = ROOT / "params.yaml"
    assert skinlesion(["pipeline", "run-local", "--data", str(data), "--pipeline_root",
                       str(tmp_path / "root"), "--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(data) in err, err[-2000:]
    assert {"missing": "does not exist", "empty": "images/", "no_images": "no .jpg",
            "no_labels": "labels.csv", "empty_labels": "labels.csv"}[case] in err
    assert not (tmp_path / "root").exists()


@pytest.fixture
def committed_project(tmp_path, monkeypatch):
    """A git checkout holding the project's params.yaml, as `skinlesion exp run` needs."""
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    for role in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{role}_NAME", "t")
        monkeypatch.setenv(f"GIT_{role}_EMAIL", "t@example.com")
    for args in (["init", "-q"], ["add", "params.yaml"], ["commit", "-qm", "params"]):
        subprocess.run(["git", *args], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("override,named", [
    ("evaluate.bootstrap=-1", "evaluate.bootstrap = -1: must be >= 0"),
    ("train.gpu_resident=maybe", "train.gpu_resident = 'maybe': must be one of auto, on, off"),
    ("+train.epoch=3", "unknown key train.epoch"),
    ("params.yaml:train.epochs=0", "train.epochs = 0: must be at least 1"),
    ("train.dims=[&a [1], *a]", "aliases"),
])
def test_exp_run_refuses_a_bad_override_before_dvc_starts(committed_project, capsys, override,
                                                          named):
    from components.commands import experiments

    assert experiments.main(["run", "-S", override]) == 1
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1 and "dvc exp run failed" not in err, err


def test_exp_run_accepts_yaml_booleans_for_on_off_choices(committed_project, tmp_path):
    from components.commands import experiments

    (tmp_path / "cpu.yaml").write_text("train:\n  gpu_resident: on\n")  # as DVC writes it
    experiments.check_overrides(committed_project, [str(tmp_path / "cpu.yaml")],
                                ["train.gpu_resident=off", "~train.dims", "other.yaml:x=1"])


def test_pipeline_compile_with_a_workspace_params_file_not_utf8_is_one_line(committed_project,
                                                                            capsys):
    """The workspace params.yaml is compared with the committed one before either is parsed:
    that read went around the params loader (a UnicodeDecodeError traceback)."""
    from components.commands.cli import main as skinlesion

    (committed_project / "params.yaml").write_bytes(b"train:\n  epochs: \xff\n")
    assert skinlesion(["pipeline", "compile", "-o", str(committed_project / "p.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "params.yaml is not UTF-8" in err, err


def test_a_read_only_output_folder_is_one_line_per_step(tmp_path):
    """preprocess, split, class_weights, train and evaluate into a read-only file system (a
    tmpfs remounted read-only: root ignores file modes, not that): one line naming the path
    each."""
    import sys

    from full_disk import on_small_tmpfs
    from test_evaluate import save_checkpoint
    from tiny_data import TINY, make_splits

    data = make_splits(tmp_path / "data", n_per_class=12)  # enough for a paper split
    model = save_checkpoint(tmp_path / "checkpoint_last.pt")
    ro = tmp_path / "ro"
    python = [sys.executable, "-m"]
    steps = {
        "preprocess": ["--labels", data["train"], "--images", data["img_dir"], "--out",
                       ro / "prepared", "--size", "32", "--workers", "1"],
        "split": ["--labels", data["train"], "--out", ro / "splits", "--mode", "paper"],
        "class_weights": ["--train", data["train"], "--out", ro / "class_weights.json"],
        "train": ["--train_csv", data["train"], "--img_dir", data["img_dir"], "--out_dir",
                  ro / "train", *TINY, "--epochs", "1", "--num_workers", "0", "--no_mlflow"],
        "evaluate": ["--model", model, "--test_csv", data["test"], "--img_dir",
                     data["img_dir"], "--out", ro / "eval", "--bootstrap", "0",
                     "--num_workers", "0", "--no_mlflow"],
    }
    script = "\n".join(
        [f"mount -o remount,ro {ro}"] +
        [" ".join(map(str, [*python, f"components.{step}", *args])) +
         f" >/dev/null 2>{tmp_path}/{step}.err; echo $? >{tmp_path}/{step}.rc"
         for step, args in steps.items()])
    on_small_tmpfs(ro, 1024, script, cwd=ROOT, timeout=300)
    for step in steps:
        err = (tmp_path / f"{step}.err").read_text().strip().splitlines()
        assert (tmp_path / f"{step}.rc").read_text().strip() == "1", (step, err)
        assert err and err[-1].startswith(f"{step}: ") and "Traceback" not in "\n".join(err)
        assert "Read-only file system" in err[-1] and str(ro) in err[-1], (step, err)
