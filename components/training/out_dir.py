"""The training output folder: one training at a time, nothing overwritten unasked, a
`--resume auto` that continues the same recipe or sets another one's run aside.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path

from components.common import outputs
from components.common.config import TrainConfig
from components.training import checkpoint

LOCK = ".train.lock"
# Settings that change how a training runs, not what it computes: `--resume auto` continues a
# run whichever of them differ (the sampling and augmentation draws are seeded per sample, so
# workers and input path do not change them). Of nodes and gpus_per_node only the number of
# processes counts (the world size, as run): the effective batch, steps per epoch and LR
# schedule follow it.
EXECUTION_SETTINGS = ("num_workers", "compile", "gpu_resident", "gpu_resident_max_share",
                      "nodes", "gpus_per_node")
# What a run leaves in its out dir, moved aside together when another recipe supersedes it.
RUN_FILES = (outputs.CHECKPOINT_LAST, outputs.CHECKPOINT_PREV, outputs.CHECKPOINT_BEST,
             f"{outputs.CHECKPOINT_LAST}.corrupt", outputs.EMA_WEIGHTS, outputs.TRAINING_SUMMARY,
             outputs.CALIBRATION, outputs.OOD_STATS)
SUPERSEDED = "superseded-"


class TrainingRefused(RuntimeError):
    """The out dir is in use or would be overwritten."""


def refuse_clobbering(out_dir: Path, resume) -> None:
    """A fresh training (no --resume) into a folder holding an earlier run's files would
    overwrite them: refuse, whichever of them is there."""
    if resume is not None or not (found := _run_files(out_dir)):
        return
    last = out_dir / outputs.CHECKPOINT_LAST
    how = (f"pass --resume {last} to continue it" if last.exists() else
           "move it away to keep it, or pass --resume auto to have it moved aside")
    raise TrainingRefused(f"{out_dir} already holds {found[0]} of an earlier training: {how}, "
                          f"or choose another --out_dir")


def _run_files(out_dir: Path) -> list[str]:
    return [name for name in RUN_FILES if (out_dir / name).exists()]


@contextlib.contextmanager
def exclusive(out_dir: Path):
    """Hold out_dir/.train.lock for the whole run; a second training into it refuses.

    flock, not a mere file: the kernel releases it when the holder dies, so a killed run
    never leaves a stale lock behind. Stale temporary files of a killed run (atomic.py) are
    removed once the lock is ours.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            raise TrainingRefused(f"{out_dir} is in use by another training ({holder}); wait "
                                  f"for it or choose another --out_dir") from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        for stale in [*out_dir.glob(".*.tmp"), *out_dir.glob(".*.link")]:
            stale.unlink()
        yield


def settings_fingerprint(cfg: TrainConfig, world_size: int, input_digest: str,
                         overfit_n: int | None) -> str:
    """sha256 of what a training's result depends on: the settings but EXECUTION_SETTINGS, the
    number of processes, and the input files (TrainingData.input_digest)."""
    recipe = {k: v for k, v in cfg.as_dict().items() if k not in EXECUTION_SETTINGS}
    return hashlib.sha256(json.dumps([recipe, world_size, overfit_n, input_digest],
                                     sort_keys=True, default=str).encode()).hexdigest()


def auto_resume(out_dir: Path, fingerprint: str) -> tuple[dict | None, Path | None]:
    """`--resume auto`, with out_dir locked (`exclusive`): (checkpoint, its file) of out_dir's
    last checkpoint when it was made with the same recipe and inputs (an interrupted `dvc
    repro` rerun, a resubmitted TrainJob); else (None, None), a fresh start, with any earlier
    run moved aside.

    Moved aside rather than refused: the callers (a DVC stage, a KFP retry) run unattended, and
    a refusal would stop every `dvc repro` after a params change until someone deletes files by
    hand; moved, nothing is lost and the folder is named for whoever wants it back or gone.
    """
    last = out_dir / outputs.CHECKPOINT_LAST
    if not last.exists():
        if _run_files(out_dir):  # an earlier run's best, which a first best epoch replaces
            print(f"train: no {last.name} to resume; the earlier run's files are moved to "
                  f"{_supersede(out_dir)}; starting over (--resume auto)", flush=True)
        return None, None
    try:
        found, used = checkpoint.load_for_resume(last, fallback=True)
    except checkpoint.CheckpointError as err:
        print(f"train: {err}", file=sys.stderr)
        found, used = None, None
    if found is not None and found.get("train_config", {}).get("fingerprint") == fingerprint:
        print(f"train: resuming {used} (epoch {found['epoch']}): same recipe and inputs",
              flush=True)
        return found, used
    why = "is unreadable" if found is None else "was made with another recipe or inputs"
    print(f"train: {last.name} {why}; its run is moved to {_supersede(out_dir)}; starting over "
          f"(--resume auto)", flush=True)
    return None, None


def _supersede(out_dir: Path) -> Path:
    """Move the run files in out_dir to out_dir/superseded-<UTC time>/; returns that folder."""
    aside = out_dir / f"{SUPERSEDED}{datetime.now(timezone.utc):%Y%m%dT%H%M%S.%fZ}"
    aside.mkdir()
    for name in _run_files(out_dir):
        os.replace(out_dir / name, aside / name)
    return aside
