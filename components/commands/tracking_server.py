"""`skinlesion tracking-server`: MLflow's tracking server and UI on this project's store.

    skinlesion tracking-server [--port 5000] [--host 127.0.0.1] [--allowed_hosts NAME,...]
    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000     # then every step logs through it

The store is the project's `mlflow.db`, the one every step uses without MLFLOW_TRACKING_URI,
and the artifacts are `mlartifacts/` beside it, the folder those steps write: runs logged
before and after the server started are in one place, and the server hands out the files
itself (--serve-artifacts), so clients need no access to the folder. `--store` takes another
SQLAlchemy URI (e.g. postgresql://...); its artifacts then go to the project's `mlartifacts/`.

MLflow 3 answers only requests whose Host header is localhost or a private address (its
protection against DNS rebinding): a UI opened under another name (the machine's host name, an
SSH tunnel's, a proxy's) needs `--allowed_hosts that-name` (or `that-name:5000`).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from components.common import cli_args, tracking
from components.commands import venv


def command(store: str, artifacts: str | os.PathLike, host: str = "127.0.0.1",
            port: int = 5000, allowed_hosts: str | None = None, workers: int = 1) -> list[str]:
    """The `mlflow server` command line for `store` with its artifacts in `artifacts`."""
    return [venv.tool("mlflow"), "server", "--backend-store-uri", store,
            "--artifacts-destination", str(artifacts), "--serve-artifacts",
            "--host", host, "--port", str(port), "--workers", str(workers),
            *(["--allowed-hosts", allowed_hosts] if allowed_hosts else [])]


def main(argv: list[str] | None = None) -> int:
    root = tracking.project_root()
    parser = cli_args.ArgumentParser(prog="skinlesion tracking-server",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default=f"sqlite:///{root / 'mlflow.db'}",
                        help="the backend store (default: the project's mlflow.db)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (0.0.0.0: every one)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--allowed_hosts", default=None, metavar="NAMES",
                        help="Host headers to answer besides localhost and private addresses")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    artifacts = tracking.local_artifact_root(args.store) or root / tracking.ARTIFACTS_DIR
    artifacts.mkdir(parents=True, exist_ok=True)
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    print(f"MLflow: store {tracking.redact(args.store)}, artifacts {artifacts}\n"
          f"UI and API at {url}; for the steps: export MLFLOW_TRACKING_URI={url}", flush=True)
    cmd = command(args.store, artifacts, args.host, args.port, args.allowed_hosts, args.workers)
    os.execv(cmd[0], cmd)  # the server in this process: Ctrl-C and signals reach it directly


if __name__ == "__main__":
    sys.exit(main())
