"""The commands of this interpreter's environment (dvc, mlflow, uvicorn): found next to
sys.executable, so that `.venv/bin/skinlesion ...` works without an activated venv."""
from __future__ import annotations

import os
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """The path of one of this environment's console scripts (`dvc`, `mlflow`)."""
    return str(BIN / name)


def with_tools_on_path(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `env` (default: os.environ) with this environment's bin folder first on PATH,
    for child processes that call its commands by name (DVC stages' `python -m ...`)."""
    env = dict(os.environ if env is None else env)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env
