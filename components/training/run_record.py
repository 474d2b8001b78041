"""What a training's MLflow run records about itself: a name and description that say what
differs from the default recipe and which data it trained on, its tags and inputs.

Every call goes through tracking.Run, which logs nothing without a run (--no_mlflow, DDP
ranks > 0) and never lets a tracking failure stop training.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from components.common import outputs
from components.common.config import TrainConfig
from components.training.training_data import DataVersion, TrainingData

# Settings that change how fast a run goes, not what it learns: left out of its name.
RUNTIME_SETTINGS = {"num_workers", "compile", "gpu_resident", "gpu_resident_max_share"}
# nodes / gpus_per_node do change the effective batch: they stay in the name
SHORT = {"peak_lr": "lr", "img_size": "img", "epochs": "ep", "batch_size": "bs",
         "weighted_sampler": "sampler", "defer_sampler_epochs": "drs",
         "class_weighted_loss": "loss_weights",
         "logit_adjust_tau": "tau", "mixup_alpha": "mixup", "ema_decay": "ema"}


def differences(cfg: TrainConfig) -> dict:
    """The recipe settings in which cfg differs from the default (params.yaml's) recipe."""
    default = TrainConfig()
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if f.name not in RUNTIME_SETTINGS and getattr(cfg, f.name) != getattr(default, f.name)}


def _value(value) -> str:
    if isinstance(value, (tuple, list)):
        return "-".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).lower() if isinstance(value, bool) else str(value)


def run_name(cfg: TrainConfig, split_mode: str | None) -> str:
    """`paper grouped` plus what differs, e.g. `paper grouped ep=3 img=64 dims=32-64-96-128 s1`:
    two runs that differ in a setting never share a name."""
    diff = differences(cfg)
    seed = diff.pop("seed", None)
    diff.pop("preset", None)
    parts = [cfg.preset, split_mode or "unsplit"]
    parts += [f"{SHORT.get(k, k)}={_value(v)}" for k, v in diff.items()]
    if seed is not None:
        parts.append(f"s{seed}")
    return " ".join(parts)


def description(cfg: TrainConfig, data: TrainingData) -> str:
    """The run's note (mlflow.note.content): the recipe and the data in words; evaluate adds
    the metrics."""
    split_mode = data.lineage.get("split_mode")
    diff = differences(cfg)
    changed = ", ".join(f"{k} {_value(v)}" for k, v in diff.items()) or "none"
    widths = f"widths {_value(cfg.dims)}" if cfg.dims else "the preset's widths"
    return (f"Hybrid ConvNeXtV2 preset `{cfg.preset}` ({widths}), {cfg.img_size} px, "
            f"{cfg.epochs} epochs, {split_mode or 'unknown'} split, seed {cfg.seed}.\n\n"
            f"Differs from params.yaml's recipe in: {changed}.\n\n"
            f"Data: {data_version(data)}.\n")


def data_version(data: TrainingData) -> str:
    """Which data the run trained on, in words: the git revision that holds it when there is
    one (`skinlesion data diff` takes it)."""
    v, dvc_file = data.version, outputs.RAW_DATA_DVC
    if v.dvc_hash is None:
        return f"not versioned by DVC (no {dvc_file}); hash {data.data_hash}"
    if v.rev is None:
        return (f"{dvc_file} {v.dvc_hash}, not committed (git {v.commit[:12]} holds other "
                f"data)")
    return f"{dvc_file} {v.dvc_hash} at git {v.rev[:12]}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def data_rev(version: DataVersion) -> str:
    """The data_rev tag: the git revision holding the data, else "uncommitted" (data/raw.dvc
    edited since the commit) or "none" (no data/raw.dvc)."""
    return version.rev or ("none" if version.dvc_hash is None else "uncommitted")


def log_start(run_, cfg: TrainConfig, run_config: dict, device: torch.device, world_size: int,
              data: TrainingData, frames: dict) -> None:
    """Params, tags, name, description and datasets of a new training run."""
    lineage, version = data.lineage, data.version
    run_.log_params(run_config)
    run_.set_tags({"mlflow.runName": run_name(cfg, lineage.get("split_mode")),
                   "mlflow.note.content": description(cfg, data),
                   "split_mode": lineage.get("split_mode") or "unknown",
                   "split_hash": lineage.get("split_hash") or "unknown",
                   "recipe_differs": ",".join(differences(cfg)) or "none",
                   "color_constancy": lineage.get("color_constancy") or "none",
                   "preprocess_corrupt": str(lineage.get("preprocess_corrupt") or 0),
                   "git_commit": version.commit, "data_hash": data.data_hash,
                   "data_rev": data_rev(version),
                   "device": device_name(device), "world_size": str(world_size),
                   **dvc_experiment_tags()})
    run_.log_datasets(frames, data.data_hash)


def dvc_experiment_tags() -> dict:
    """Under `dvc exp run`, which DVC experiment this run is and the commit it started from
    (git_commit is that commit too: the experiment's own commit is made after the stages);
    `dvc exp show` and `skinlesion exp show` list the experiment by that name."""
    tags = {"dvc_experiment": os.environ.get("DVC_EXP_NAME"),
            "dvc_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV")}
    return {k: v for k, v in tags.items() if v}
