"""Run a command in its own process group, so a timeout kills it and every child it started
(torchrun's ranks, dvc's stage commands) instead of leaving orphans behind."""
from __future__ import annotations

import os
import signal
import subprocess


def run_group(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    with subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            raise AssertionError(f"{cmd[:6]}... ran past {timeout} s; output:\n"
                                 f"{stdout[-2000:]}\n{stderr[-2000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
