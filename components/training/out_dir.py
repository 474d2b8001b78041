"""The training output folder: one training at a time, nothing overwritten unasked, and the
lineage of the inputs (which preprocess and which split made them).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from pathlib import Path

from components.common import outputs

LOCK = ".train.lock"


class TrainingRefused(RuntimeError):
    """The out dir is in use or would be overwritten."""


def refuse_clobbering(out_dir: Path, resume) -> None:
    if resume is None and (out_dir / outputs.CHECKPOINT_LAST).exists():
        last = out_dir / outputs.CHECKPOINT_LAST
        raise TrainingRefused(f"{out_dir} already holds {last.name}: pass --resume {last} to "
                              f"continue it, or choose another --out_dir")


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


def lineage(train_csv, img_dir) -> dict:
    """What made the inputs: the split report beside the train CSV (mode, split_hash) and the
    preprocess report beside the images (the short side they were resized to)."""
    split = _read(Path(train_csv).parent / outputs.SPLIT_REPORT)
    prep = _read(Path(img_dir).parent / outputs.PREPROCESS_REPORT)
    return {"split_mode": split.get("mode"), "split_hash": split.get("split_hash"),
            "prepare_size": prep.get("size"),
            "color_constancy": prep.get("color_constancy", "none"),
            "minkowski_p": prep.get("minkowski_p", 6.0),
            "preprocess_corrupt": (prep.get("counts") or {}).get("corrupt")}


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
