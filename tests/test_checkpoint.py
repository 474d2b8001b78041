"""Checkpoints: exact resume, truncated files, the layout evaluation relies on."""
from __future__ import annotations

import pytest
import torch

from components.training import checkpoint

from components import train
from tiny_data import TINY, make_splits

COMMON = [*TINY, "--batch_size", "8", "--warmup_epochs", "1", "--num_workers", "0",
          "--no-mlflow", "--epochs", "4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_splits(tmp_path_factory.mktemp("tiny"))


def _train(data, out, *extra) -> int:
    return train.main(["--train_csv", str(data["train"]), "--val_csv", str(data["val"]),
                       "--img_dir", str(data["img_dir"]), "--out_dir", str(out), *COMMON, *extra])


def test_two_epochs_plus_resume_equals_four_straight(data, tmp_path):
    """The full recipe (augmentation, mixup, weighted sampler, EMA) so every RNG is exercised,
    on the resident input path; test_train's worker test does the DataLoader path."""
    path = ["--gpu_resident", "on"]
    assert _train(data, tmp_path / "straight", *path) == 0
    assert _train(data, tmp_path / "split", *path, "--stop_after_epoch", "2") == 0
    halfway = checkpoint.load(tmp_path / "split" / "checkpoint_last.pt")
    assert halfway["epoch"] == 2 and halfway["step"] == 8
    assert _train(data, tmp_path / "split", *path, "--resume",
                  str(tmp_path / "split" / "checkpoint_last.pt")) == 0

    a = checkpoint.load(tmp_path / "straight" / "checkpoint_last.pt")
    b = checkpoint.load(tmp_path / "split" / "checkpoint_last.pt")
    assert a["epoch"] == b["epoch"] == 4 and a["step"] == b["step"]
    for which in ("model", "ema"):
        for key, value in a[which].items():
            torch.testing.assert_close(b[which][key], value, atol=1e-6, rtol=0, msg=key)
    assert [h["train_loss"] for h in a["history"]] == pytest.approx(
        [h["train_loss"] for h in b["history"]], abs=1e-6)


def test_resume_from_a_truncated_checkpoint_refuses_naming_the_file(data, tmp_path, capsys):
    out = tmp_path / "out"
    assert _train(data, out, "--stop_after_epoch", "1") == 0
    ckpt = out / "checkpoint_last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    assert _train(data, out, "--resume", str(ckpt)) == 1
    err = capsys.readouterr().err
    assert str(ckpt) in err and "truncated" in err
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint_last.pt"):
        checkpoint.load_model(ckpt)


def test_a_resume_puts_back_the_best_checkpoint_a_stopped_run_did_not_leave(data, tmp_path,
                                                                           capsys):
    """Stopped after the best epoch's checkpoint_last.pt landed but before checkpoint_best.pt
    did (a kill, or an earlier version's failed write): the resume restores it."""
    out = tmp_path / "out"
    assert _train(data, out, "--stop_after_epoch", "1") == 0
    (out / "checkpoint_best.pt").unlink()
    assert _train(data, out, "--stop_after_epoch", "1", "--resume",
                  str(out / "checkpoint_last.pt")) == 0
    best = checkpoint.load(out / "checkpoint_best.pt")
    assert best["epoch"] == best["best"]["epoch"] == 1
    assert (out / "checkpoint_best.pt").read_bytes() == (out / "checkpoint_last.pt").read_bytes()

    # An earlier best epoch's file gone: not rebuilt (its weights are nowhere), but said.
    last = checkpoint.load(out / "checkpoint_last.pt")
    checkpoint.save(out / "checkpoint_last.pt", {**last, "best": {**last["best"], "epoch": 0}})
    (out / "checkpoint_best.pt").unlink()
    capsys.readouterr()
    assert _train(data, out, "--stop_after_epoch", "1", "--resume",
                  str(out / "checkpoint_last.pt")) == 0
    assert "checkpoint_best.pt (best epoch 0) is missing" in capsys.readouterr().err
    assert not (out / "checkpoint_best.pt").exists()


def test_load_model_rejects_unknown_weights_and_foreign_files(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"not": "ours"}, path)
    with pytest.raises(checkpoint.CheckpointError, match="not a"):
        checkpoint.load(path)
    with pytest.raises(ValueError, match="which"):
        checkpoint.load_model(path, which="best")


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np
    state = checkpoint.rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint.save(tmp_path / "rng.pt", {"rng": state})
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "rng.pt")["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]


def test_linking_the_best_checkpoint_from_another_file_system_copies_it(tmp_path):
    """A resume from a checkpoint on another file system (`--resume /mnt/other/...`) whose
    epoch is the best one: checkpoint_best.pt is put back as a copy (a hard link there is
    EXDEV, and failed the resumed training)."""
    import errno
    import os
    import tempfile
    from pathlib import Path

    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's tmp folder")
    with tempfile.TemporaryDirectory(dir=shm) as other:
        resumed = Path(other) / "checkpoint_last.pt"
        resumed.write_bytes(b"the best epoch's checkpoint")
        with pytest.raises(OSError) as err:
            os.link(resumed, tmp_path / "probe")
        assert err.value.errno == errno.EXDEV
        checkpoint.link(resumed, tmp_path / "checkpoint_best.pt")
        assert (tmp_path / "checkpoint_best.pt").read_bytes() == b"the best epoch's checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_best.pt"]
