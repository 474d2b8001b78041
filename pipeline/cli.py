"""`skinlesion pipeline compile|submit|run-local|train-job`: the Kubeflow pipeline, and a
distributed training on Kubeflow Trainer, from the command line.

    skinlesion pipeline compile [-o pipeline.yaml] [--image IMAGE] [--params_file ...]
    skinlesion pipeline submit --host URL [--experiment NAME] [--run_name NAME]
                               [--params_file params.demo.yaml] [-S k=v ...]
    skinlesion pipeline run-local [--data data/raw] [--pipeline_root local_outputs]
                                  [--params_file params.demo.yaml] [-S k=v ...]
    skinlesion pipeline train-job --image IMAGE --pvc PVC [--namespace NS] <train flags>

Arguments start from the committed params.yaml (git HEAD: an uncommitted or applied
experiment's copy is not used unless `--params params.yaml` asks for it, and the command says
so); each `--params_file` (a partial params file with params.yaml's layout, such as
params.demo.yaml) is merged over it in order, then each `-S` is applied. An `-S` key
is either a params.yaml key with dots (`train.epochs=2`, `split.seed=1`) or one of the
pipeline's own parameters (`mlflow_tracking_uri=http://mlflow:5000`, `data_rev=v1.2`); values
are read as YAML (`2` is an int, `0.005` a float, `true` a bool, `{a: 1}` a dict).

Caching: KFP reuses a task's outputs when the same component ran with the same inputs before
(same image, code, parameters and input artifacts). materialise-data and register never cache
(the data source and the registry live outside the pipeline); `--no_cache` turns it off for
every task of a run.

train-job: `skinlesion train`'s flags (paths as the pods see them, on the volume PVC) run
as `torchrun -m components.train <train flags>` on train.nodes x train.gpus_per_node
processes of IMAGE; the command waits for the TrainJob and prints rank 0's log.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from components.common import cli_args
from components.common.config import PARAMS_FILE, ConfigError
from pipeline.trainjob import MOUNT


def resolve_params(params_files: list[str] | None = None, overrides: list[str] | None = None,
                   params_path: str | None = None) -> tuple[dict, dict[str, Any]]:
    """(params, direct pipeline arguments): the base params + params files + `k=v` overrides,
    every section checked (a ConfigError names the file and key)."""
    from components.common.config import check_params, deep_merge, load_params
    from pipeline.pipeline import base_params

    params = base_params(params_path, say=lambda m: print(m, file=sys.stderr))
    params = deep_merge(params, load_params(params_files or []))
    direct: dict[str, Any] = {}
    for item in overrides or []:
        key, value = cli_args.parse_assignment(item)
        if "." in key:  # a params.yaml key; the pipeline's own parameters have no dot
            cli_args.set_dotted(params, key, value)
        else:
            direct[key] = value
    sources = [params_path or f"committed {PARAMS_FILE}", *(params_files or ())]
    check_params(params, ", ".join(map(str, sources)) + (" and -S" if overrides else ""))
    return params, direct


def build(params_files: list[str] | None = None, overrides: list[str] | None = None,
          params_path: str | None = None, image: str | None = None) -> tuple[dict, Any, dict]:
    """(params, the pipeline built from them, its arguments): params.yaml + params files +
    `k=v` overrides. The one build of a command: a `k=v` without a dot must name a parameter
    of this pipeline (shared_pvc only when it trains distributed)."""
    from pipeline.pipeline import build_pipeline, pipeline_arguments

    params, direct = resolve_params(params_files, overrides, params_path)
    pipeline = build_pipeline(params, image)
    names = set(pipeline.component_spec.inputs or {})
    if unknown := sorted(set(direct) - names):
        raise SystemExit(f"-S {unknown[0]}: not a pipeline parameter "
                         f"({', '.join(sorted(names))}) nor a dotted params.yaml key")
    return params, pipeline, {**pipeline_arguments(params), **direct}


def cmd_compile(args: argparse.Namespace) -> int:
    from pipeline.pipeline import compile_pipeline

    params, _ = resolve_params(args.params_file, [], args.params)
    path = compile_pipeline(args.output, image=args.image, params=params)
    print(f"wrote {path}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    import kfp

    from pipeline.pipeline import PIPELINE_NAME, compile_pipeline

    params, pipeline, arguments = build(args.params_file, args.set, args.params, args.image)
    client = kfp.Client(host=args.host, namespace=args.namespace,
                        existing_token=os.environ.get("KFP_TOKEN") or None)
    with tempfile.TemporaryDirectory() as tmp:
        package = args.package or str(compile_pipeline(Path(tmp) / "pipeline.yaml",
                                                       image=args.image, params=params,
                                                       pipeline=pipeline))
        result = client.create_run_from_pipeline_package(
            package, arguments=arguments, run_name=args.run_name or None,
            experiment_name=args.experiment, namespace=args.namespace,
            enable_caching=False if args.no_cache else None)
    url = f"{args.host.rstrip('/')}/#/runs/details/{result.run_id}"
    print(f"submitted run {result.run_id}: {url}", file=sys.stderr)
    print(json.dumps({"run_id": result.run_id, "url": url, "pipeline": PIPELINE_NAME,
                      "experiment": args.experiment, "host": args.host}))
    return 0


def cmd_run_local(args: argparse.Namespace) -> int:
    from kfp import local

    from pipeline.data import check_dataset_folder

    _, pipeline, arguments = build(args.params_file, args.set, args.params)
    arguments["local_data"] = str(Path(args.data or arguments["data_path"]).resolve())
    check_dataset_folder(arguments["local_data"])
    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=args.pipeline_root, raise_on_error=True)
    pipeline(**arguments)
    print(f"outputs under {Path(args.pipeline_root).resolve()}")
    return 0


def cmd_train_job(args: argparse.Namespace) -> int:
    from components import train
    from pipeline import trainjob

    # parsed here too: a bad flag stops before anything is submitted
    parser = train.build_parser()
    parser.prog = "skinlesion pipeline train-job"
    params_files, params, cfg = train.settings(parser.parse_args(args.train_flags))
    trainjob.submit_and_wait(trainjob.command_request(args.image, args.pvc, args.namespace,
                                                      args.train_flags, cfg, params))
    train.check_params_unchanged(params_files, params)  # the nodes never saw this file
    return 0


def _add_params_options(p: argparse.ArgumentParser, overrides: bool = True) -> None:
    p.add_argument("--params", default=None,
                   help="base params file (default: the committed params.yaml)")
    p.add_argument("--params_file", action="append", default=[], metavar="FILE",
                   help="partial params file merged over it (repeatable), e.g. params.demo.yaml")
    if overrides:
        cli_args.add_set_flag(p, "override a params.yaml key (train.epochs=2) or set a "
                                 "pipeline parameter (data_rev=v1.2)")


def main(argv: list[str] | None = None) -> int:
    parser = cli_args.ArgumentParser(prog="skinlesion pipeline",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True,
                                parser_class=cli_args.ArgumentParser)

    p = sub.add_parser("compile", help="compile the pipeline to KFP v2 YAML")
    p.add_argument("-o", "--output", default="pipeline.yaml")
    p.add_argument("--image", default=None,
                   help="container image of every step (default: $SKINLESION_IMAGE or the project's)")
    _add_params_options(p, overrides=False)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("submit", help="compile and start a run on a Kubeflow Pipelines host")
    p.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    p.add_argument("--experiment", default="skin-lesion")
    p.add_argument("--run_name", default="")
    p.add_argument("--namespace", default=None, help="multi-user KFP: the profile namespace")
    p.add_argument("--package", default=None, help="a compiled pipeline YAML (default: compile now)")
    p.add_argument("--image", default=None, help="as for compile")
    p.add_argument("--no_cache", action="store_true", help="disable KFP caching for this run")
    _add_params_options(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("run-local", help="run the pipeline on this machine (kfp.local, no cluster)")
    p.add_argument("--data", default=None,
                   help="local raw dataset folder (images/, labels.csv[, metadata.csv]); default params' data.raw")
    p.add_argument("--pipeline_root", default="local_outputs")
    _add_params_options(p)
    p.set_defaults(func=cmd_run_local)

    p = sub.add_parser("train-job", allow_abbrev=False,
                       usage="skinlesion pipeline train-job --image IMAGE --pvc PVC "
                             "[--namespace NS] <skinlesion train flags>",
                       help="train with `skinlesion train`'s flags as a Kubeflow Trainer "
                            "TrainJob (train.nodes x train.gpus_per_node processes)",
                       description="The train flags (`skinlesion train --help`) are checked "
                                   "here, then run as given on every node.")
    p.add_argument("--image", required=True, help="the project's image the nodes run")
    p.add_argument("--pvc", required=True,
                   help=f"ReadWriteMany volume holding data and outputs, mounted at {MOUNT}")
    p.add_argument("--namespace", default=None,
                   help="Kubernetes namespace (default: the kubeconfig's)")
    p.set_defaults(func=cmd_train_job)

    args, train_flags = parser.parse_known_args(argv)  # only train-job takes others' flags
    if train_flags and args.command != "train-job":
        parser.error(f"unrecognized arguments: {' '.join(train_flags)}")
    args.train_flags = train_flags
    try:
        return args.func(args)
    except ConfigError as err:  # a bad params file, setting or data folder: one line
        print(f"skinlesion pipeline {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
