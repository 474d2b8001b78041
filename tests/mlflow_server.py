"""A real `mlflow server` subprocess on 127.0.0.1 for tests (SQLite backend, local artifacts).

Use the fixture by importing it into a test module:

    from mlflow_server import mlflow_server  # noqa: F401  (the fixture)

    def test_x(mlflow_server, monkeypatch):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)

The server is started once per test session (it takes seconds) and terminated at the end;
`start_mlflow_server` does the same outside pytest; `stoppable_mlflow_server` gives a test a
server of its own that it can kill mid-run.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest

MLFLOW = Path(sys.executable).with_name("mlflow")
START_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def _serve(root: Path, **popen) -> Iterator[tuple[str, subprocess.Popen]]:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, cwd=root, **popen)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(uri):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start; log:\n"
                                   f"{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextlib.contextmanager
def start_mlflow_server(root: Path) -> Iterator[str]:
    """Run `mlflow server` with its store under `root`; yield its http URI."""
    with _serve(root) as (uri, _):
        yield uri


@contextlib.contextmanager
def stoppable_mlflow_server(root: Path) -> Iterator[tuple[str, Callable[[], None]]]:
    """A server of its own, in its own process group; yields (uri, stop). stop() kills the
    server and every worker it started at once, as a crash would; exit stops it too."""
    with _serve(root, start_new_session=True) as (uri, proc):
        def stop() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        try:
            yield uri, stop
        finally:
            stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """The http URI of a running MLflow server (one per test session)."""
    with start_mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as uri:
        yield uri
