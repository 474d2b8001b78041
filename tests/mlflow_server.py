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
import sys
from pathlib import Path
from typing import Callable, Iterator


from procs import free_port, serve

MLFLOW = Path(sys.executable).with_name("mlflow")
START_TIMEOUT_S = 90


@contextlib.contextmanager
def _serve(root: Path, artifacts: str | None = None,
           **popen) -> Iterator[tuple[str, subprocess.Popen]]:
    """`mlflow server` with a SQLite store under `root`; artifacts there too unless given."""
    root.mkdir(parents=True, exist_ok=True)
    uri = f"http://127.0.0.1:{free_port()}"
    cmd = [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", uri.rsplit(":", 1)[1],
           "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", artifacts or str(root / "artifacts")]
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
