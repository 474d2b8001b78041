"""A real full file system for fault tests: a small tmpfs, mounted over a folder inside a
private user and mount namespace (`unshare -rm`, no root needed), gone when the script ends."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def on_small_tmpfs(folder: Path, size_kib: int, script: str, **run) -> subprocess.CompletedProcess:
    """Run the shell `script` with `folder` a tmpfs of `size_kib` KiB (the script may grow it:
    `mount -o remount,size=64m <folder>`); skips where namespaces are not permitted."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -rm (user and mount namespaces) is not permitted here")
    folder.mkdir(parents=True, exist_ok=True)
    mounted = f"mount -t tmpfs -o size={size_kib}k tmpfs {folder} && {{\n{script}\n}}"
    return subprocess.run(["unshare", "-rm", "sh", "-c", mounted], capture_output=True,
                          text=True, **run)
