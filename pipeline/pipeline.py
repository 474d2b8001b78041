"""The Kubeflow pipeline: materialise data/raw -> preprocess, split -> class_weights -> train
(GPU) -> evaluate -> register (only when the test metric clears the gate).

Every default comes from params.yaml (`load_params`, `pipeline_arguments`); a partial
params file such as params.demo.yaml is merged over it by `skinlesion pipeline run-local|submit
--params-file`, never by editing params.yaml.

DAG (task names as compiled; data edges are artifacts):

    materialise-data ─┬─> preprocess ───────────────────────┬──> train ──> evaluate ──> metric-gate
                      └─> split ──────────> class-weights ───┘       (GPU)                  └─> register
                            └── (splits also to train, evaluate and register) ──┘

materialise-data puts data/raw (DVC remote at a git revision, or a local folder) into the
first artifact; its DVC hash travels in every artifact's metadata. register runs only when
evaluate's gate metric (register.gate_metric) is >= gate_threshold.
"""
# no `from __future__ import annotations`: KFP reads the pipeline signature's annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from kfp import compiler, dsl, kubernetes

from pipeline import components as c

ROOT = Path(__file__).resolve().parents[1]
PARAMS_ENV = "SKINLESION_PARAMS"
PIPELINE_NAME = "skin-lesion"

# Kubernetes settings of the train task
GPU_RESOURCE = "nvidia.com/gpu"
GPU_COUNT = 1
GPU_TOLERATION = dict(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
SHM_SIZE = "16Gi"  # DataLoader workers share batches through /dev/shm
# Secrets the tasks read credentials from (names are pipeline parameters; keys fixed here)
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                  "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
MLFLOW_SECRET_KEYS = {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                      "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"}


def params_path() -> Path:
    """params.yaml: $SKINLESION_PARAMS, else ./params.yaml, else the project's."""
    if os.environ.get(PARAMS_ENV):
        return Path(os.environ[PARAMS_ENV])
    cwd = Path.cwd() / "params.yaml"
    return cwd if cwd.is_file() else ROOT / "params.yaml"


def deep_merge(base: dict, override: dict) -> dict:
    """`override` over `base`, recursively for dicts; neither input is modified."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_params(path: str | os.PathLike | None = None,
                overrides: list[str | os.PathLike] | tuple = ()) -> dict:
    """params.yaml with each override file (partial, same layout) merged over it in order."""
    with open(path or params_path()) as f:
        params = yaml.safe_load(f) or {}
    for extra in overrides:
        with open(extra) as f:
            params = deep_merge(params, yaml.safe_load(f) or {})
    return params


def _section(values: dict) -> dict:
    """A params section as a KFP struct: a protobuf Struct cannot hold null, and a null in
    params.yaml means "the step's default" (e.g. train.dims), so null keys are left out."""
    return {k: v for k, v in values.items() if v is not None}


def pipeline_arguments(params: dict) -> dict[str, Any]:
    """The pipeline's parameters from a params.yaml-shaped dict (defaults and overrides)."""
    pre, spl, reg = params["preprocess"], params["split"], params["register"]
    return {
        "data_path": params.get("data", {}).get("raw", "data/raw"),
        "preprocess_size": int(pre["size"]),
        "preprocess_skip_corrupt": bool(pre["skip_corrupt"]),
        "split_mode": str(spl["mode"]),
        "split_seed": int(spl["seed"]),
        "split_val_frac": float(spl["val_frac"]),
        "split_test_frac": float(spl["test_frac"]),
        "train_params": _section(params["train"]),
        "evaluate_params": _section(params["evaluate"]),
        "model_name": str(reg["model_name"]),
        "gate_metric": str(reg["gate_metric"]),
        "gate_threshold": float(reg["gate_threshold"]),
    }


_D = pipeline_arguments(load_params())


@dsl.pipeline(name=PIPELINE_NAME,
              description="ISIC 2019 hybrid ConvNeXtV2 + separable self-attention: "
                          "preprocess, split, class weights, train (GPU), evaluate, register")
def skin_lesion_pipeline(
    # the DVC-versioned input: a git repo + revision + DVC remote, or a local folder
    data_repo: str = "",
    data_rev: str = "",
    data_remote: str = "",
    data_path: str = _D["data_path"],
    local_data: str = "",
    s3_endpoint_url: str = "",
    # steps (defaults: params.yaml)
    preprocess_size: int = _D["preprocess_size"],
    preprocess_skip_corrupt: bool = _D["preprocess_skip_corrupt"],
    split_mode: str = _D["split_mode"],
    split_seed: int = _D["split_seed"],
    split_val_frac: float = _D["split_val_frac"],
    split_test_frac: float = _D["split_test_frac"],
    train_params: dict = _D["train_params"],
    evaluate_params: dict = _D["evaluate_params"],
    model_name: str = _D["model_name"],
    gate_metric: str = _D["gate_metric"],
    gate_threshold: float = _D["gate_threshold"],
    # services
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "skin-lesion",
    s3_secret: str = "skinlesion-s3",
    mlflow_secret: str = "skinlesion-mlflow",
):
    data = c.materialise_data(local_path=local_data, repo_url=data_repo, rev=data_rev,
                              remote=data_remote, path=data_path, endpoint_url=s3_endpoint_url)
    data.set_display_name("materialise data/raw").set_caching_options(False)
    kubernetes.use_secret_as_env(data, secret_name=s3_secret, secret_key_to_env=S3_SECRET_KEYS)

    prep = c.preprocess(raw=data.outputs["raw"], size=preprocess_size,
                        skip_corrupt=preprocess_skip_corrupt)
    spl = c.split(raw=data.outputs["raw"], mode=split_mode, seed=split_seed,
                  val_frac=split_val_frac, test_frac=split_test_frac)
    cw = c.class_weights(splits=spl.outputs["splits"])

    tr = c.train(prepared=prep.outputs["prepared"], splits=spl.outputs["splits"],
                 weights=cw.outputs["weights"], train_params=train_params,
                 mlflow_tracking_uri=mlflow_tracking_uri, mlflow_experiment=mlflow_experiment,
                 s3_endpoint_url=s3_endpoint_url)
    tr.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(GPU_COUNT)
    kubernetes.add_toleration(tr, **GPU_TOLERATION)
    kubernetes.empty_dir_mount(tr, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                               size_limit=SHM_SIZE)

    ev = c.evaluate(model=tr.outputs["model"], prepared=prep.outputs["prepared"],
                    splits=spl.outputs["splits"], evaluate_params=evaluate_params,
                    gate_metric=gate_metric, mlflow_tracking_uri=mlflow_tracking_uri,
                    s3_endpoint_url=s3_endpoint_url)

    # kfp.local resolves a condition on a task's single `Output` parameter (not a named one)
    with dsl.If(ev.outputs["Output"] >= gate_threshold, name="metric-gate"):
        reg = c.register(model=tr.outputs["model"], evaluation=ev.outputs["evaluation"],
                         splits=spl.outputs["splits"], model_name=model_name,
                         gate_metric=gate_metric, gate_value=ev.outputs["Output"],
                         preprocess_size=preprocess_size, mlflow_tracking_uri=mlflow_tracking_uri,
                         mlflow_experiment=mlflow_experiment, s3_endpoint_url=s3_endpoint_url)
        reg.set_caching_options(False)

    for task in (tr, ev, reg):
        kubernetes.use_secret_as_env(task, secret_name=s3_secret, secret_key_to_env=S3_SECRET_KEYS)
        # optional: an MLflow server without authentication needs no secret
        kubernetes.use_secret_as_env(task, secret_name=mlflow_secret,
                                     secret_key_to_env=MLFLOW_SECRET_KEYS, optional=True)


def compile_pipeline(path: "str | os.PathLike" = "pipeline.yaml", image: "str | None" = None) -> Path:
    """Compile the pipeline (with its Kubernetes platform config) to a YAML file.

    `image` replaces every step's container image (default: `pipeline.components.IMAGE`,
    fixed when that module was imported).
    """
    path = Path(path)
    compiler.Compiler().compile(skin_lesion_pipeline, package_path=str(path))
    if image:
        docs = list(yaml.safe_load_all(path.read_text()))
        for executor in docs[0]["deploymentSpec"]["executors"].values():
            executor["container"]["image"] = image
        header = "".join(line for line in path.read_text().splitlines(True) if line.startswith("#"))
        path.write_text(header + yaml.safe_dump_all(docs, sort_keys=True))
    return path
