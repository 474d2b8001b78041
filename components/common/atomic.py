"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename.

A reader (or a resumed run after kill -9) sees either the old file or the complete new one,
never a half-written file.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _test_hold(path)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# Test hook (tests/test_faults.py): with SKINLESION_TEST_HOLD_BEFORE_RENAME=<file name>, the
# first write that would replace an existing file of that name (once per process) stops just
# before its rename, touches <path>.held and waits until that marker is deleted, so a test can
# kill -9 the process at exactly this point or start a second one meanwhile. Unset: a no-op.
HOLD_ENV = "SKINLESION_TEST_HOLD_BEFORE_RENAME"
_held: set[str] = set()


def _test_hold(path: Path, limit_s: float = 600.0) -> None:
    if os.environ.get(HOLD_ENV) != path.name or not path.exists() or path.name in _held:
        return
    _held.add(path.name)
    marker = path.with_name(path.name + ".held")
    marker.touch()
    deadline = time.monotonic() + limit_s
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
