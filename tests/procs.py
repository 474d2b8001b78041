"""Subprocesses for tests: commands in their own process group, so a timeout kills them and
every child they started (torchrun's ranks, dvc's stage commands) instead of leaving orphans,
and background servers (mlflow, moto, `skinlesion serve`) that are waited for and stopped."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str, timeout: float = 2) -> bool:
    """True once anything answers HTTP at `url` (an error status counts: the server is up)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def serve(cmd: list[str], ready_url: str, log_path: Path, timeout: float = 90,
          **popen) -> Iterator[subprocess.Popen]:
    """Start a server, wait until `ready_url` answers, stop it on exit; its output goes to
    `log_path`, whose tail is in the error when it dies or does not come up in time."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **popen)
        try:
            deadline = time.monotonic() + timeout
            while not answers(ready_url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{Path(cmd[0]).name} {cmd[1]} did not start; log:\n"
                                       f"{Path(log_path).read_text(errors='replace')[-3000:]}")
                time.sleep(0.3)
            yield proc
        finally:
            stop(proc)
