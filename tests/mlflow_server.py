"""A real `mlflow server` subprocess on 127.0.0.1 for tests (SQLite backend, local artifacts).

conftest.py makes it the session fixture `mlflow_server` (its URI):

    def test_x(mlflow_server, monkeypatch):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)

`start_mlflow_server` starts one outside pytest; `stoppable_mlflow_server` gives a test a
server of its own that it can kill mid-run.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Callable, Iterator


from components.commands import tracking_server
from procs import free_port, serve

START_TIMEOUT_S = 90


@contextlib.contextmanager
def _serve(root: Path, artifacts: str | None = None,
           **popen) -> Iterator[tuple[str, subprocess.Popen]]:
    """`mlflow server` with a SQLite store under `root`; artifacts there too unless given."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = tracking_server.command(f"sqlite:///{root / 'mlflow.db'}",
                                  artifacts or root / "artifacts", port=port)
    with serve(cmd, f"{uri}/health", root / "server.log", START_TIMEOUT_S, cwd=root,
               **popen) as proc:
        yield uri, proc


@contextlib.contextmanager
def start_mlflow_server(root: Path, artifacts: str | None = None, **popen) -> Iterator[str]:
    """Run `mlflow server` with its store under `root` (artifacts: e.g. an s3:// URI the
    server proxies to); yield its http URI."""
    with _serve(root, artifacts, **popen) as (uri, _):
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
