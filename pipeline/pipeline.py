"""The Kubeflow pipeline: materialise data/raw -> preprocess -> split -> class_weights ->
train (GPU) -> evaluate -> register (which applies the metric gate itself, as under DVC).

Every default comes from params.yaml: each step gets its section as a dict parameter
(`train_params`, ...), and the Kubernetes resources of each task come from its `kubeflow`
section. The params are the committed params.yaml (`base_params`): a workspace copy with
uncommitted changes (a `dvc exp run` leaves one) is not baked into a pipeline unasked.

DAG (task names as compiled; data edges are artifacts):

    materialise-data ─> preprocess ─> split ─> class-weights ─> train (GPU) ─> evaluate ─> register
                             └──────────────(prepared images)──────┘──────────────┘
"""
# no `from __future__ import annotations`: KFP reads the pipeline signature's annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from kfp import compiler, dsl, kubernetes

from components.common import atomic
from components.common.config import (PARAMS_FILE, STEP_SECTIONS, TrainConfig, check_params,
                                       committed_text, load_params, parse_params,
                                       task_resources)
from components.common.params_yaml import read_text
from pipeline import kfp_components as c
from pipeline import trainjob

ROOT = Path(__file__).resolve().parents[1]
PARAMS_ENV = "SKINLESION_PARAMS"
PIPELINE_NAME = "skin-lesion"

GPU_RESOURCE = "nvidia.com/gpu"
GPU_TOLERATION = dict(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
SHM_SIZE = "16Gi"  # DataLoader workers share batches through /dev/shm
# Secrets the tasks read credentials from (names are pipeline parameters; each key becomes the
# environment variable of the same name)
S3_SECRET_KEYS = {key: key for key in trainjob.S3_SECRET_KEYS}
MLFLOW_SECRET_KEYS = {key: key for key in trainjob.MLFLOW_SECRET_KEYS}


def params_path() -> "Path | None":
    """The base params file: $SKINLESION_PARAMS, ./params.yaml, else the checkout's (none in an
    installed image run elsewhere: then every step's defaults, which equal params.yaml's)."""
    if os.environ.get(PARAMS_ENV):
        return Path(os.environ[PARAMS_ENV])
    for candidate in (Path.cwd() / PARAMS_FILE, ROOT / PARAMS_FILE):
        if candidate.is_file():
            return candidate
    return None


def base_params(path: "str | os.PathLike | None" = None, say=print) -> dict:
    """params.yaml as committed (git HEAD), or `path` when one is given explicitly.

    Without `path`: params_path(); when its workspace copy differs from its git HEAD's (an
    applied `dvc exp run`, an edit), HEAD's is used and `say` tells which and why.
    """
    if path is not None:
        return load_params(path)
    workspace = params_path()
    if workspace is None:
        return {}
    committed, text = committed_text(workspace), read_text(workspace)
    if committed is None or committed == text:
        return parse_params(text, str(workspace))
    say(f"note: {workspace} has uncommitted changes (an applied experiment?); using the "
        f"committed params.yaml (git HEAD). Pass --params {workspace} to use the workspace "
        f"copy.")
    return parse_params(committed, f"git HEAD:{PARAMS_FILE}")


def _section(values: dict) -> dict:
    """A params section as a KFP struct: KFP's compiler takes no null, and a null in
    params.yaml means "the step's default" (e.g. train.dims), so null keys are left out here
    (compile_pipeline writes them, and integers as integers, into the compiled YAML)."""
    return {k: v for k, v in (values or {}).items() if v is not None}


def pipeline_arguments(params: dict) -> dict[str, Any]:
    """The pipeline's parameters from a params.yaml-shaped dict (defaults and overrides)."""
    return {"data_path": (params.get("data") or {}).get("raw", "data/raw"),
            **{f"{name}_params": _section(params.get(name)) for name in STEP_SECTIONS}}


def _apply(task, res: dict) -> None:
    cpu, memory = str(res["cpu"]), str(res["memory"])
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
    if int(res.get("gpu") or 0):
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(int(res["gpu"]))
        kubernetes.add_toleration(task, **GPU_TOLERATION)


def build_pipeline(params: dict, image: str | None = None):
    """The pipeline function, its defaults and task resources taken from `params`; with
    train.nodes x train.gpus_per_node > 1 the train task submits a Kubeflow Trainer TrainJob
    (that many DDP processes) instead of training in its own pod."""
    check_params(params)  # every step's values: a bad one fails here, not in the cluster
    d = pipeline_arguments(params)
    res = task_resources(params)
    train_cfg = TrainConfig.resolve(params)
    distributed = train_cfg.world_size > 1

    def skin_lesion_pipeline(
        # the DVC-versioned input: a git repo + revision + DVC remote, or a local folder
        data_repo: str = "",
        data_rev: str = "",
        data_remote: str = "",
        data_path: str = d["data_path"],
        local_data: str = "",
        s3_endpoint_url: str = "",
        # each step's params.yaml section
        preprocess_params: dict = d["preprocess_params"],
        split_params: dict = d["split_params"],
        class_weights_params: dict = d["class_weights_params"],
        train_params: dict = d["train_params"],
        evaluate_params: dict = d["evaluate_params"],
        register_params: dict = d["register_params"],
        # services
        mlflow_tracking_uri: str = "",
        mlflow_experiment: str = "skin-lesion",
        s3_secret: str = trainjob.S3_SECRET,
        mlflow_secret: str = trainjob.MLFLOW_SECRET,
        # distributed training: the ReadWriteMany volume every node and the train task mount
        shared_pvc: str = "skinlesion-work",
    ):
        data = c.materialise_data(local_path=local_data, repo_url=data_repo, rev=data_rev,
                                  remote=data_remote, path=data_path,
                                  endpoint_url=s3_endpoint_url)
        data.set_display_name("materialise data/raw").set_caching_options(False)
        prep = c.preprocess(raw=data.outputs["raw"], preprocess_params=preprocess_params)
        spl = c.split(prepared=prep.outputs["prepared"], split_params=split_params)
        cw = c.class_weights(splits=spl.outputs["splits"],
                             class_weights_params=class_weights_params)
        services = dict(mlflow_tracking_uri=mlflow_tracking_uri, s3_endpoint_url=s3_endpoint_url)
        inputs = dict(prepared=prep.outputs["prepared"], splits=spl.outputs["splits"],
                      weights=cw.outputs["weights"], train_params=train_params,
                      mlflow_experiment=mlflow_experiment, **services)
        if distributed:
            tr = c.train_distributed(**inputs, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                                     node_resources={k: str(res["train"][k])
                                                     for k in ("cpu", "memory")},
                                     shared_pvc=shared_pvc, image=image or c.IMAGE,
                                     s3_secret=s3_secret, mlflow_secret=mlflow_secret)
            tr.set_display_name(f"train on {train_cfg.nodes} node(s) x "
                                f"{train_cfg.gpus_per_node} GPU(s)")
            kubernetes.mount_pvc(tr, pvc_name=shared_pvc, mount_path=trainjob.MOUNT)
        else:
            tr = c.train(**inputs)
            kubernetes.empty_dir_mount(tr, volume_name="dshm", mount_path="/dev/shm",
                                       medium="Memory", size_limit=SHM_SIZE)
        ev = c.evaluate(model=tr.outputs["model"], prepared=prep.outputs["prepared"],
                        splits=spl.outputs["splits"], evaluate_params=evaluate_params, **services)
        reg = c.register(model=tr.outputs["model"], evaluation=ev.outputs["evaluation"],
                         splits=spl.outputs["splits"], register_params=register_params,
                         mlflow_experiment=mlflow_experiment, **services)
        reg.set_caching_options(False)  # the registry is outside the pipeline's artifacts

        for name, task in (("materialise", data), ("preprocess", prep), ("split", spl),
                           ("class_weights", cw), ("train", tr), ("evaluate", ev),
                           ("register", reg)):
            # a distributed train task only submits and waits: the nodes get the GPUs
            _apply(task, res["default"] if distributed and name == "train" else res[name])
        # Both optional: data from a folder and an MLflow server that serves its artifacts
        # itself need no S3 credentials; a server without authentication needs no password.
        # A step that does reach S3 without them fails naming the endpoint.
        kubernetes.use_secret_as_env(data, secret_name=s3_secret,
                                     secret_key_to_env=S3_SECRET_KEYS, optional=True)
        for task in (tr, ev, reg):
            kubernetes.use_secret_as_env(task, secret_name=s3_secret,
                                         secret_key_to_env=S3_SECRET_KEYS, optional=True)
            kubernetes.use_secret_as_env(task, secret_name=mlflow_secret,
                                         secret_key_to_env=MLFLOW_SECRET_KEYS, optional=True)

    if not distributed:
        # KFP takes the parameters from the signature: the single-pod pipeline's has no volume
        # parameter (the body reads shared_pvc only when distributed; its default stays)
        signature = inspect.signature(skin_lesion_pipeline)
        skin_lesion_pipeline.__signature__ = signature.replace(parameters=[
            p for p in signature.parameters.values() if p.name != "shared_pvc"])
    return dsl.pipeline(name=PIPELINE_NAME,
                        description="ISIC 2019 hybrid ConvNeXtV2 + separable self-attention: "
                                    "preprocess, split, class weights, train (GPU), evaluate, "
                                    "register")(skin_lesion_pipeline)


def compile_pipeline(path: "str | os.PathLike" = "pipeline.yaml", image: "str | None" = None,
                     params: "dict | None" = None, pipeline=None) -> Path:
    """Compile the pipeline (with its Kubernetes platform config) to a YAML file.

    `params`: the params dict whose values become the defaults (default: base_params()).
    `image` replaces every step's container image (default: `pipeline.kfp_components.IMAGE`).
    `pipeline`: build_pipeline(params, image) when the caller has built it already.
    """
    path = Path(path)
    if params is None:
        params = base_params(say=lambda m: print(m, file=sys.stderr))
    pipeline = pipeline or build_pipeline(params, image)
    compiler.Compiler().compile(pipeline, package_path=str(path))
    text = path.read_text()
    docs = list(yaml.safe_load_all(text))
    # KFP's compiler writes a dict default as a protobuf Struct: every number a float
    # (epochs: 100.0) and no nulls; KFP loads the YAML's own values, so write params.yaml's
    inputs = docs[0]["root"]["inputDefinitions"]["parameters"]
    for name in STEP_SECTIONS:
        inputs[f"{name}_params"]["defaultValue"] = dict(params.get(name) or {})
    if image:
        for executor in docs[0]["deploymentSpec"]["executors"].values():
            executor["container"]["image"] = image
    header = "".join(line for line in text.splitlines(True) if line.startswith("#"))
    atomic.write_text(path, header + yaml.safe_dump_all(docs, sort_keys=True))
    return path
