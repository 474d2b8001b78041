"""`skinlesion pipeline compile|submit|run-local|dvc-args`: the Kubeflow pipeline from the command line.

    skinlesion pipeline compile [-o pipeline.yaml] [--image IMAGE]
    skinlesion pipeline submit --host URL [--experiment NAME] [--run-name NAME]
                               [--params-file params.demo.yaml] [--param k=v ...]
    skinlesion pipeline run-local [--data data/raw] [--pipeline-root local_outputs]
                                  [--params-file params.demo.yaml] [--param k=v ...]
    skinlesion pipeline dvc-args params.demo.yaml | xargs dvc exp run -n demo

Arguments to a run start from params.yaml; each `--params-file` (a partial params file with
params.yaml's layout, such as params.demo.yaml) is merged over it in order, then each
`--param` is applied. A `--param` key is either a params.yaml key with dots
(`train.epochs=2`, `split.seed=1`) or one of the pipeline's own parameters
(`mlflow_tracking_uri=http://mlflow:5000`, `data_rev=v1.2`, `gate_threshold=0.6`); values are
read as YAML (`2` is an int, `0.005` a float, `true` a bool, `{a: 1}` a dict).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml


def _set_dotted(params: dict, dotted: str, value: Any) -> None:
    node = params
    *parents, leaf = dotted.split(".")
    for key in parents:
        if not isinstance(node.get(key), dict):
            raise SystemExit(f"--param {dotted}: {key!r} is not a section of params.yaml")
        node = node[key]
    if leaf not in node:
        raise SystemExit(f"--param {dotted}: no such key in params.yaml")
    node[leaf] = value


def build_arguments(params_files: list[str] | None = None,
                    param: list[str] | None = None,
                    params_path: str | None = None) -> dict[str, Any]:
    """The pipeline's arguments: params.yaml + params files + `k=v` overrides."""
    from pipeline.pipeline import load_params, pipeline_arguments, skin_lesion_pipeline

    names = set(skin_lesion_pipeline.component_spec.inputs or {})
    params = load_params(params_path, overrides=params_files or ())
    direct: dict[str, Any] = {}
    for item in param or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--param {item!r}: expected KEY=VALUE")
        value = yaml.safe_load(raw) if raw != "" else ""
        if key in names:
            direct[key] = value
        elif "." in key:
            _set_dotted(params, key, value)
        else:
            raise SystemExit(f"--param {key}: not a pipeline parameter ({', '.join(sorted(names))}) "
                             "nor a dotted params.yaml key")
    arguments = pipeline_arguments(params)
    arguments.update(direct)
    return arguments


def cmd_compile(args: argparse.Namespace) -> int:
    from pipeline.pipeline import compile_pipeline

    path = compile_pipeline(args.output, image=args.image)
    print(f"wrote {path}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    import kfp

    from pipeline.pipeline import PIPELINE_NAME, compile_pipeline

    arguments = build_arguments(args.params_file, args.param, args.params)
    client = kfp.Client(host=args.host, namespace=args.namespace,
                        existing_token=os.environ.get("KFP_TOKEN") or None)
    with tempfile.TemporaryDirectory() as tmp:
        package = args.package or str(compile_pipeline(Path(tmp) / "pipeline.yaml", image=args.image))
        result = client.create_run_from_pipeline_package(
            package, arguments=arguments, run_name=args.run_name or None,
            experiment_name=args.experiment, namespace=args.namespace,
            enable_caching=False if args.no_cache else None)
    print(json.dumps({"run_id": result.run_id, "pipeline": PIPELINE_NAME,
                      "experiment": args.experiment, "host": args.host}))
    return 0


def cmd_run_local(args: argparse.Namespace) -> int:
    from kfp import local

    from pipeline.pipeline import skin_lesion_pipeline

    arguments = build_arguments(args.params_file, args.param, args.params)
    arguments["local_data"] = str(Path(args.data or arguments["data_path"]).resolve())
    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=args.pipeline_root, raise_on_error=True)
    skin_lesion_pipeline(**arguments)
    print(f"outputs under {Path(args.pipeline_root).resolve()}")
    return 0


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _has(params: dict, dotted: str) -> bool:
    node = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def dvc_set_params(override_file: str, params_path: str | None = None) -> list[str]:
    """`dvc exp run` flags applying a partial params file: -S key=value per leaf, in DVC's
    (Hydra's) override grammar; `+key=value` adds a key params.yaml does not have."""
    from pipeline.pipeline import load_params

    params = load_params(params_path)
    with open(override_file) as f:
        override = yaml.safe_load(f) or {}
    flags = []
    for key, value in _leaves(override):
        text = json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else (
            "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value))
        flags += ["-S", f"{'' if _has(params, key) else '+'}{key}={text}"]
    return flags


def cmd_dvc_args(args: argparse.Namespace) -> int:
    import shlex

    print(" ".join(shlex.quote(flag) for flag in dvc_set_params(args.file, args.params)))
    return 0


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default=None,
                   help="base params file (default: $SKINLESION_PARAMS or ./params.yaml)")
    p.add_argument("--params-file", action="append", default=[], metavar="FILE",
                   help="partial params file merged over params.yaml (repeatable), e.g. params.demo.yaml")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override: params.yaml key with dots (train.epochs=2) or a pipeline parameter")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="skinlesion pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="compile the pipeline to KFP v2 YAML")
    p.add_argument("-o", "--output", default="pipeline.yaml")
    p.add_argument("--image", default=None,
                   help="container image of every step (default: $SKINLESION_IMAGE or the project's)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("submit", help="compile and start a run on a Kubeflow Pipelines host")
    p.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    p.add_argument("--experiment", default="skin-lesion")
    p.add_argument("--run-name", default="")
    p.add_argument("--namespace", default=None, help="multi-user KFP: the profile namespace")
    p.add_argument("--package", default=None, help="a compiled pipeline YAML (default: compile now)")
    p.add_argument("--image", default=None, help="as for compile")
    p.add_argument("--no-cache", action="store_true", help="disable KFP caching for this run")
    _add_run_options(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("run-local", help="run the pipeline on this machine (kfp.local, no cluster)")
    p.add_argument("--data", default=None,
                   help="local raw dataset folder (images/, labels.csv[, metadata.csv]); default params' data.raw")
    p.add_argument("--pipeline-root", default="local_outputs")
    _add_run_options(p)
    p.set_defaults(func=cmd_run_local)

    p = sub.add_parser("dvc-args", help="`dvc exp run` -S flags that apply a partial params file, "
                                         "e.g. `skinlesion pipeline dvc-args params.demo.yaml | xargs dvc exp run`")
    p.add_argument("file", help="partial params file, e.g. params.demo.yaml")
    p.add_argument("--params", default=None, help="base params file (default: ./params.yaml)")
    p.set_defaults(func=cmd_dvc_args)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
