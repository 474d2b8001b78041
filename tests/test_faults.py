"""Faults during training, each ending with nothing lost: kill -9 at three points, a truncated
checkpoint, the MLflow server dying mid-run, two trainings at once.

Training runs as a subprocess (its own process group, killed with it) on tiny data through the
DataLoader path with --num_workers 0, where a resume is exact on CPU: every interrupted run is
resumed to the end and compared with one uninterrupted reference run, weights within 1e-6.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from components.common import atomic, outputs

from components.training import checkpoint

from components import evaluate, train
from components.training.trainer import BEST, EMA_WEIGHTS, LAST
from full_disk import on_small_tmpfs
from mlflow_server import stoppable_mlflow_server
from tiny_data import TINY, make_splits

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 6
ARGS = [*TINY, "--batch_size", "8", "--warmup_epochs", "1", "--num_workers", "0",
        "--gpu_resident", "off", "--epochs", str(EPOCHS)]
# One torch thread in this module's processes and in-process runs alike (equal numbers need
# equal thread counts): a tiny model gains nothing from two, and two trainings side by side on
# two cores do not fight over them.
THREADS = 1
ENV = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONUNBUFFERED": "1"}
HELD = f"{LAST}.held"  # atomic.py's test hook marker
TIMEOUT_S = 180


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """96 training images (12 steps an epoch), 16 validation images."""
    paths = make_splits(tmp_path_factory.mktemp("faults-data"), n_per_class=12)
    val = pd.read_csv(paths["val"])
    val.groupby("label").head(2).to_csv(paths["val"], index=False)
    return paths


def _args(data, out: Path, *extra: str) -> list[str]:
    return ["--train_csv", str(data["train"]), "--val_csv", str(data["val"]),
            "--img_dir", str(data["img_dir"]), "--out_dir", str(out), *ARGS, *extra]


def _cmd(data, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "components.train", *_args(data, out, *extra)]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must end equal to (in-process: the same
    numbers as a subprocess with the same thread count, and seconds cheaper)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert train.main(_args(data, out, "--no-mlflow")) == 0
    return out


@contextlib.contextmanager
def spawned(cmd: list[str], log: Path, env: dict | None = None):
    """A training subprocess in its own process group; whatever happens, killed on exit."""
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or ENV, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            kill_9(proc)


def kill_9(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = TIMEOUT_S) -> None:
    """Poll `condition` every 10 ms while `proc` runs."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) first:\n"
                                 f"{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s in vain:\n{log.read_text()[-3000:]}")
        time.sleep(0.01)


def assert_same_weights(got: Path, want: Path) -> None:
    a, b = checkpoint.load(got), checkpoint.load(want)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    for which in ("model", "ema"):
        if which in b:
            assert a[which].keys() == b[which].keys()
            for key, value in b[which].items():
                torch.testing.assert_close(a[which][key], value, atol=1e-6, rtol=0,
                                           msg=f"{got} {which}.{key}")


def losses(ckpt: dict) -> list[float]:
    return [h["train_loss"] for h in ckpt["history"]]


def assert_on_reference_path(ckpt: dict, reference: Path) -> None:
    """A checkpoint left by a killed run lies on the reference trajectory: its epochs so far
    had exactly the reference's losses."""
    want = losses(checkpoint.load(reference / LAST))[: ckpt["epoch"]]
    assert losses(ckpt) == pytest.approx(want, abs=1e-6)


# -- kill -9 -----------------------------------------------------------------------------------
def test_kill_9_at_three_points_then_resume_ends_on_the_uninterrupted_weights(
        data, reference, tmp_path, capsys):
    out, last = tmp_path / "out", tmp_path / "out" / LAST
    resume = ("--no-mlflow", "--resume", str(last))
    epochs = []

    # 1. The moment checkpoint_last.pt first exists (epoch 1 just saved, best being written).
    with spawned(_cmd(data, out, "--no-mlflow"), tmp_path / "1.log") as proc:
        wait_for(last.exists, proc, tmp_path / "1.log")
        kill_9(proc)
    epochs.append(checkpoint.load(last)["epoch"])

    # 2. Inside a later epoch: the resumed run saves twice (timing its epochs), then dies a
    #    third of an epoch after the second save (a timing choice: before the next save).
    with spawned(_cmd(data, out, *resume), tmp_path / "2.log") as proc:
        saves = []
        for _ in range(2):
            inode = last.stat().st_ino
            wait_for(lambda: last.stat().st_ino != inode, proc, tmp_path / "2.log")
            saves.append(time.monotonic())
        time.sleep((saves[1] - saves[0]) / 3)
        kill_9(proc)
    epochs.append(checkpoint.load(last)["epoch"])

    # 3. Inside a checkpoint write: the new file written and fsynced, the rename not yet done.
    hold = {**ENV, atomic.HOLD_ENV: LAST}
    with spawned(_cmd(data, out, *resume), tmp_path / "3.log", env=hold) as proc:
        wait_for((out / HELD).exists, proc, tmp_path / "3.log")
        pending = list(out.glob(f".{LAST}.*.tmp"))
        kill_9(proc)
    (out / HELD).unlink()
    epochs.append(checkpoint.load(last)["epoch"])

    assert epochs[0] >= 1 and epochs[1] == epochs[0] + 2, epochs
    assert epochs[2] == epochs[1] < EPOCHS, "the held write must not have landed"
    assert len(pending) == 1 and pending[0].exists()  # the half-done write is left behind...
    assert evaluate._resolve_checkpoint(out) == last  # ...and is never taken for a checkpoint
    assert_on_reference_path(checkpoint.load(last), reference)
    assert checkpoint.load(out / checkpoint.PREV)["epoch"] == epochs[2]  # linked before the hold

    capsys.readouterr()
    assert train.main(_args(data, out, *resume)) == 0
    assert f"from epoch {epochs[2]}" in capsys.readouterr().out
    assert not list(out.glob(".*.tmp"))  # the resumed run cleared the dead write
    assert_same_weights(last, reference / LAST)
    assert_same_weights(out / EMA_WEIGHTS, reference / EMA_WEIGHTS)
    assert_same_weights(out / BEST, reference / BEST)
    assert losses(checkpoint.load(last)) == pytest.approx(
        losses(checkpoint.load(reference / LAST)), abs=1e-6)


# -- a truncated checkpoint ----------------------------------------------------------------------
def test_truncated_checkpoint_refuses_and_falls_back_only_when_asked(data, reference, tmp_path,
                                                                     capsys):
    out, last = tmp_path / "out", tmp_path / "out" / LAST
    assert train.main(_args(data, out, "--no-mlflow", "--stop_after_epoch", "2")) == 0
    assert checkpoint.load(out / checkpoint.PREV)["epoch"] == 1
    broken = last.read_bytes()[: last.stat().st_size // 2]
    last.write_bytes(broken)
    capsys.readouterr()

    # Not asked: refuses naming the file, touches nothing (the good previous one is not used).
    assert train.main(_args(data, out, "--no-mlflow", "--resume", str(last))) == 1
    err = capsys.readouterr().err
    assert f"checkpoint {last} is unreadable (truncated or corrupt?)" in err
    assert last.read_bytes() == broken and not list(out.glob("*.corrupt"))

    # Asked: warns naming both files, keeps the bad one aside, resumes from epoch 1 to the end.
    assert train.main(_args(data, out, "--no-mlflow", "--resume", str(last),
                            "--resume_fallback")) == 0
    err = capsys.readouterr().err
    assert str(last) in err and str(out / checkpoint.PREV) in err and "(epoch 1)" in err
    assert (out / f"{LAST}.corrupt").read_bytes() == broken
    assert_same_weights(last, reference / LAST)
    assert_same_weights(out / EMA_WEIGHTS, reference / EMA_WEIGHTS)

    # Asked, but the previous one is bad too: an error naming it.
    (out / checkpoint.PREV).write_bytes(b"PK\x03\x04 not a checkpoint")
    last.write_bytes(broken)
    with pytest.raises(checkpoint.CheckpointError, match=checkpoint.PREV):
        checkpoint.load_for_resume(last, fallback=True)


# -- a full disk ---------------------------------------------------------------------------------
def test_a_full_disk_then_freed_space_and_a_resume_ends_with_the_best_checkpoint(
        data, reference, tmp_path):
    """The out dir on a tmpfs that holds one training checkpoint and the lock, but not half of
    the EMA weights more: a write of the one-epoch run fails (no space), space is freed, and
    `--resume auto` (as `dvc repro` reruns it) ends with every output the stage declares,
    checkpoint_best.pt of the best epoch included."""
    out, kept = tmp_path / "out", tmp_path / "kept"
    size_kib = ((reference / LAST).stat().st_size + (reference / EMA_WEIGHTS).stat().st_size // 2
                ) // 1024
    run = " ".join(_cmd(data, out, "--no-mlflow", "--resume", "auto", "--epochs", "1"))
    script = (f"{run}; echo $? > {tmp_path}/full.rc\n"
              f"mount -o remount,size=64m {out}\n"  # space freed
              f"{run}; echo $? > {tmp_path}/freed.rc\n"
              f"mkdir {kept} && cp -a {out}/. {kept}/")
    done = on_small_tmpfs(out, size_kib, script, cwd=ROOT, env=ENV, timeout=TIMEOUT_S)
    log = done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "full.rc").read_text().strip() == "1", log
    assert "no space left on the device writing" in done.stderr, log
    assert (tmp_path / "freed.rc").read_text().strip() == "0", log
    summary = json.loads((kept / outputs.TRAINING_SUMMARY).read_text())
    assert summary["completed"] and summary["best_epoch"] == 1
    best = checkpoint.load(kept / BEST)
    assert best["epoch"] == 1 and best["best"]["epoch"] == 1
    assert_same_weights(kept / BEST, kept / LAST)  # epoch 1 is both


# -- params edited while training -------------------------------------------------------------
def test_params_edited_while_training_fail_the_run_naming_the_keys(data, tmp_path):
    """`dvc repro` records the params on disk at the stage's end: a training that used other
    values must fail (no dvc.lock entry), naming the changed keys; other sections are not its
    business."""
    import yaml

    params, out = tmp_path / "params.yaml", tmp_path / "out"
    params.write_text(yaml.safe_dump({"train": {"peak_lr": 0.01, "mixup_alpha": 0.4},
                                      "evaluate": {"tta": False}}))
    log = tmp_path / "train.log"
    hold = {**ENV, atomic.HOLD_ENV: LAST}  # stops inside its epoch-2 checkpoint write
    with spawned(_cmd(data, out, "--no-mlflow", "--params", str(params)), log, env=hold) as proc:
        wait_for((out / HELD).exists, proc, log)
        params.write_text(yaml.safe_dump({"train": {"peak_lr": 0.02, "mixup_alpha": 0.4},
                                          "evaluate": {"tta": True}}))
        (out / HELD).unlink()
        assert proc.wait(timeout=TIMEOUT_S) == 1, log.read_text()[-3000:]
    final = [line for line in log.read_text().splitlines() if line.startswith("train: ")]
    assert len(final) == 1 and str(params) in final[0], log.read_text()[-3000:]
    assert "train.peak_lr (0.01 -> 0.02)" in final[0] and "evaluate" not in final[0]
    assert "Traceback" not in log.read_text()
    assert checkpoint.load(out / LAST)["train_config"]["train"]["peak_lr"] == 0.01  # kept


# -- the MLflow server dies mid-run ----------------------------------------------------------
def test_mlflow_server_dying_mid_run_keeps_training_and_fails_the_step_naming_it(
        data, reference, tmp_path):
    out = tmp_path / "out"
    with stoppable_mlflow_server(tmp_path / "mlflow") as (uri, stop):
        # MLflow's own retries (minutes by default) are not what is tested here.
        env = {**ENV, "MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
        log = tmp_path / "train.log"
        with spawned(_cmd(data, out), log, env=env) as proc:
            wait_for((out / LAST).exists, proc, log)
            stop()
            assert proc.wait(timeout=TIMEOUT_S) == 1
    text = log.read_text()
    assert text.count("warning: MLflow logging failed") == 1  # warned once, then quiet
    final = [line for line in text.splitlines() if line.startswith("train: ")]
    assert len(final) == 1 and f"tracking server {uri}" in final[0], text[-3000:]
    assert "incomplete" in final[0] and "Traceback" not in text
    summary = json.loads((out / outputs.TRAINING_SUMMARY).read_text())
    assert summary["completed"] and uri in summary["tracking_error"]
    assert summary["mlflow_run_id"] and summary["paths"]["mlflow_model_uri"] is None
    assert checkpoint.load(out / LAST)["epoch"] == EPOCHS
    # MLflow or not, the same training: nothing in the weights depends on the server.
    assert_same_weights(out / LAST, reference / LAST)
    assert_same_weights(out / EMA_WEIGHTS, reference / EMA_WEIGHTS)


# -- two trainings at once ---------------------------------------------------------------------
def test_two_trainings_into_different_out_dirs_do_not_interfere(data, reference, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    with spawned(_cmd(data, a, "--no-mlflow"), tmp_path / "a.log") as pa, \
            spawned(_cmd(data, b, "--no-mlflow", "--seed", "1"), tmp_path / "b.log") as pb:
        assert pa.wait(timeout=TIMEOUT_S) == 0, (tmp_path / "a.log").read_text()[-3000:]
        assert pb.wait(timeout=TIMEOUT_S) == 0, (tmp_path / "b.log").read_text()[-3000:]
    assert_same_weights(a / LAST, reference / LAST)  # as if it had run alone
    ckpt_b = checkpoint.load(b / LAST)
    assert ckpt_b["train_config"]["train"]["seed"] == 1 and ckpt_b["epoch"] == EPOCHS
    assert str(b) not in json.dumps(checkpoint.load(a / LAST)["train_config"])
    reference_ema = checkpoint.load(reference / LAST)["ema"]
    assert any(not torch.allclose(v, reference_ema[k]) for k, v in ckpt_b["ema"].items())
    model, meta = checkpoint.load_model(b / EMA_WEIGHTS)
    assert meta["epoch"] == EPOCHS and model(torch.zeros(1, 3, 32, 32)).shape == (1, 8)


def test_a_second_training_into_a_busy_out_dir_refuses_and_overwrites_nothing(
        data, reference, tmp_path, capsys):
    out, last = tmp_path / "out", tmp_path / "out" / LAST
    log = tmp_path / "first.log"
    hold = {**ENV, atomic.HOLD_ENV: LAST}  # the first stops inside its epoch-2 checkpoint write
    with spawned(_cmd(data, out, "--no-mlflow"), log, env=hold) as first:
        wait_for((out / HELD).exists, first, log)
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        # A resume, (another process) a `--resume auto` with other settings, which would set
        # the running one's checkpoints aside, and a fresh start: each meets the lock before
        # it reads or moves anything.
        busy = f"{out} is in use by another training (pid {first.pid} on"
        assert train.main(_args(data, out, "--no-mlflow", "--resume", str(last))) == 1
        assert busy in capsys.readouterr().err
        auto = subprocess.run(_cmd(data, out, "--no-mlflow", "--resume", "auto", "--epochs", "3"),
                              cwd=ROOT, env=ENV, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
        assert auto.returncode == 1 and busy in auto.stderr, auto.stdout + auto.stderr
        assert "starting over" not in auto.stdout + auto.stderr
        assert "Traceback" not in auto.stderr
        assert train.main(_args(data, out, "--no-mlflow")) == 1
        assert busy in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
        assert not list(out.glob("superseded-*"))
        (out / HELD).unlink()  # let the first go on
        assert first.wait(timeout=TIMEOUT_S) == 0, log.read_text()[-3000:]
    assert json.loads((out / outputs.TRAINING_SUMMARY).read_text())["completed"]
    assert_same_weights(last, reference / LAST)
    assert_same_weights(out / EMA_WEIGHTS, reference / EMA_WEIGHTS)
    assert_same_weights(out / BEST, reference / BEST)
    assert checkpoint.load(out / checkpoint.PREV)["epoch"] == EPOCHS - 1
