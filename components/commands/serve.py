"""`skinlesion serve`: the registered model behind MLflow's scoring server, with this project's
defaults, from a shell where nothing was activated.

    skinlesion serve [--model models:/skin-lesion-hybrid@champion] [--host 127.0.0.1]
                     [--port 5001] [--workers 1]

It runs MLflow's scoring server (what `mlflow models serve --env-manager local` runs) under
this interpreter's `uvicorn`, behind a guard for what MLflow's request parsing lacks (body
size, hostile JSON, error texts that repeat the request, work on a request that is gone:
components/registry/scoring_app.py), with the served model's safe defaults: no file paths,
request and image limits (components/registry/serving.py). Requests:

    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\
        -d '{"dataframe_split": {"columns": ["image"], "data": [["<base64 JPEG>"]]}}'

The answer is JSON: {"predictions": [{"MEL": 0.01, ..., "predicted": "NV", "error": ""}]};
a row that failed has null probabilities and its reason in `error`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from components.common import cli_args, tracking
from components.registry.client import CHAMPION, champion_uri
from components.registry import scoring_app
from components.registry.serving import ALLOW_PATHS_ENV
from components.commands import venv

ROOT = Path(__file__).resolve().parents[2]  # the checkout whose `components` the server imports


def command(host: str, port: int, workers: int) -> list[str]:
    return [venv.tool("uvicorn"), "--factory", "components.registry.scoring_app:create_app",
            "--app-dir", str(ROOT), "--host", host, "--port", str(port),
            "--workers", str(workers)]


def environment() -> dict[str, str]:
    env = venv.with_tools_on_path()
    env.setdefault("MLFLOW_TRACKING_URI", tracking.tracking_uri())
    env.setdefault(ALLOW_PATHS_ENV, "0")
    # MLflow prints a progress line per file fetched from the registry (59 for this model)
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return env


def main(argv: list[str] | None = None) -> int:
    parser = cli_args.ArgumentParser(prog="skinlesion serve", description=__doc__)
    parser.add_argument("--model", help=f"MLflow model URI (default models:/"
                                        f"<register.model_name>@{CHAMPION})")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--workers", type=int, default=1)
    cli_args.add_params_flags(parser)
    args = parser.parse_args(argv)
    model = args.model or champion_uri(cli_args.params_paths(args))
    env = {**environment(), scoring_app.MODEL_ENV: model}
    print(f"serving {model} on http://{args.host}:{args.port}/invocations (MLflow at "
          f"{tracking.redact(env['MLFLOW_TRACKING_URI'])})", file=sys.stderr, flush=True)
    cmd = command(args.host, args.port, args.workers)
    os.execvpe(cmd[0], cmd, env)  # the server replaces this process: signals reach it


if __name__ == "__main__":
    sys.exit(main())
