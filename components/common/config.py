"""params.yaml, read in one place: each step's typed settings, with their defaults.

Every step reads its own section of params.yaml (the DVC example-get-started rule) into the
dataclass below, whatever runs it: the DVC stage and the CLI (`--params params.yaml
[--params_file params.demo.yaml ...]`), the KFP component (the section arrives as a dict
through a protobuf Struct, where every number is a float: `from_dict` turns 100.0 back into
100 from the field's type, here and nowhere else) and the tests. The defaults here and
params.yaml agree (tests/test_config.py checks it), so a step run without a params file
behaves as `dvc repro` does.

    cfg = TrainConfig.resolve(load_params(["params.yaml", "params.demo.yaml"]), epochs=3)

Each field is the one description of its key (components.common.settings): type, default,
choices (`Literal`), help; the steps' flags are made from the fields (cli_args.add_config_flags).
Values are checked when a config is made: a bad one is a ConfigError naming the key, the
value and where it came from, before any work starts. Every params file is read by
`load_params` (components.common.params_yaml's safe loader: no aliases, bounded size and depth),
which refuses unknown sections and keys; `check_params` checks every section at once, for the
commands that start several steps.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

# ConfigError, committed_text and deep_merge are this module's API as well
from components.common.params_yaml import (ConfigError, committed_text, deep_merge, parse_yaml,
                                           read_text, shown)
from components.common.settings import Settings, check_keys, check_mapping, require
from components.common.settings import setting

PARAMS_FILE = "params.yaml"

# The keys that take one of a few names: each list is written here once.
ColorConstancy = Literal["none", "shades_of_gray"]           # common/images.py
SplitMode = Literal["grouped", "folds", "paper", "source"]            # split.py
ClassWeightMethod = Literal["balanced", "sqrt", "effective_number"]  # training/balance.py
GpuResident = Literal["auto", "on", "off"]                   # training/batches.py
LrScaling = Literal["linear", "none"]
Photometric = Literal["paper", "strong"]                      # training/photometric.py
SamplerBalance = Literal["class", "class_site"]               # training/samplers.py
COLOR_CONSTANCY = typing.get_args(ColorConstancy)
CLASS_WEIGHT_METHODS = typing.get_args(ClassWeightMethod)
GPU_RESIDENT = typing.get_args(GpuResident)


# -- params files ---------------------------------------------------------------------------
def parse_params(text: str, source: str) -> dict:
    """One params file's text as a dict (empty text is {}), its layout checked
    (check_layout); a clear error for anything else."""
    data = parse_yaml(text, f"params file {source}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"params file {source} holds a {type(data).__name__}, not sections")
    check_layout(data, f"params file {source}")
    return data


def read_yaml(path: str | os.PathLike) -> dict:
    """One params file as a dict."""
    return parse_params(read_text(path), str(path))


def load_params(paths: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> dict:
    """The params files merged in order: a full params.yaml first, partial override files
    (params.demo.yaml, params.paper.yaml) after it. None: ./params.yaml when there is one.
    This is the one reader of params files: every file's layout is checked on the way in."""
    if paths is None:
        paths = [PARAMS_FILE] if Path(PARAMS_FILE).is_file() else []
    elif isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    params: dict = {}
    for path in paths:
        params = deep_merge(params, read_yaml(path))
    return params


# -- one step's section ---------------------------------------------------------------------
class StepConfig(Settings):
    """A section of params.yaml (settings.Settings), read from params files."""

    @classmethod
    def resolve(cls, params: dict | str | os.PathLike | Sequence | None = None, *,
                source: str | None = None, **overrides):
        """Defaults <- the params' section <- overrides that are not None.

        params: a params dict (load_params; `source` names where it came from in errors), or
        params file path(s) to load."""
        source = source or "params"
        if not isinstance(params, dict):
            source = ", ".join(map(str, params)) if isinstance(params, (list, tuple)) \
                else str(params or PARAMS_FILE)
            params = load_params(params)
        section = params.get(cls.SECTION) or {}
        check_mapping(section, cls.SECTION, source)
        merged = {**section, **{k: v for k, v in overrides.items() if v is not None}}
        return cls.from_dict(merged, source)


# -- the sections of params.yaml ------------------------------------------------------------
@dataclass
class DataConfig(StepConfig):
    SECTION = "data"
    raw: str = setting("data/raw", "the raw data folder: images/, labels.csv, metadata.csv "
                                   "(tracked by data/raw.dvc)")


@dataclass
class PreprocessConfig(StepConfig):
    SECTION = "preprocess"
    size: int = setting(256, "short side after resizing once (train crops img_size from it)")
    skip_corrupt: bool = setting(False, "list unreadable images in the report and leave them "
                                        "out, instead of stopping")
    color_constancy: ColorConstancy = setting(
        "none", "colour constancy (Finlayson & Trezzi 2004), applied alike when serving")
    minkowski_p: float = setting(6.0, "the Minkowski norm of shades_of_gray")

    def check(self) -> None:
        require(self.size >= 32, self, "size", "must be at least 32")
        require(self.minkowski_p >= 1, self, "minkowski_p", "must be at least 1")


@dataclass
class SplitConfig(StepConfig):
    SECTION = "split"
    mode: SplitMode = setting("grouped", "grouped: by lesion_id, a hash of (seed, lesion) so a "
                                         "lesion keeps its split as the data grows; folds: the "
                                         "earlier StratifiedGroupKFold split; paper: "
                                         "image-level, as the paper; source: test_sources "
                                         "held out whole")
    seed: int = setting(0, "the split's random seed")
    val_frac: float = setting(0.15, "share of the images for validation")
    test_frac: float = setting(0.15, "share of the images for test")
    test_sources: tuple[str, ...] = setting((), "mode source: the sources held out whole as "
                                                "test, e.g. BCN")
    accept_relabel: bool = setting(False, "accept kept images whose label changed since the "
                                          "previous split (--previous)")

    def check(self) -> None:
        require(self.mode != "source" or bool(self.test_sources), self, "test_sources",
                 "mode source needs at least one test source (e.g. [BCN])")
        for key in ("val_frac", "test_frac"):
            require(0 < getattr(self, key) < 1, self, key, "must be between 0 and 1")
        require(self.val_frac + self.test_frac < 1, self, "test_frac",
                 f"val_frac + test_frac must be below 1 (val_frac is {self.val_frac})")


@dataclass
class ClassWeightsConfig(StepConfig):
    SECTION = "class_weights"
    method: ClassWeightMethod = setting(
        "balanced", "balanced: inverse frequency; sqrt: its square root; effective_number: "
                    "Cui et al. 2019")
    beta: float = setting(0.999, "effective_number's beta")

    def check(self) -> None:
        require(0 <= self.beta < 1, self, "beta", "must be in [0, 1)")


@dataclass
class TrainConfig(StepConfig):
    """The training recipe. Defaults: the paper's (Ozdemir & Pacal 2025), except the class
    balancing, which the HAM10000 recipe study chose (params.yaml says why)."""
    SECTION = "train"
    preset: str = setting("paper", "the model: one of model/hybrid.py's PRESETS")
    pretrained: bool | str = setting(False, "ImageNet ConvNeXtV2-base weights for the stem and "
                                            "stages 1-2: true (the hub) or a file path; or a "
                                            "backbone file of this model")
    self_supervised_epochs: int = setting(40, "SimCLR epochs on the training images before "
                                              "training, the backbone's warm start when no "
                                              "pretrained weights are given (0: none)")
    dims: tuple[int, ...] | None = setting(None, "stage widths instead of the preset's, "
                                                 "e.g. 32,64,96,128")
    depths: tuple[int, ...] | None = setting(None, "blocks per stage instead of the preset's, "
                                                   "e.g. 1,1,2,1")
    img_size: int = setting(224, "input size in pixels (the crop)")
    epochs: int = setting(100, "training epochs")
    batch_size: int = setting(32, "images per step and process (DDP: per GPU)")
    peak_lr: float = setting(0.01, "SGD learning rate after warm-up, per process")
    warmup_epochs: int = setting(5, "linear warm-up epochs, then cosine decay")
    warmup_lr: float = setting(1e-5, "learning rate the warm-up starts from")
    min_lr: float = setting(1e-6, "learning rate the cosine decay ends at")
    momentum: float = setting(0.9, "SGD momentum")
    weight_decay: float = setting(2e-5, "SGD weight decay")
    mixup_alpha: float = setting(0.4, "timm Mixup's alpha (0 disables mixup)")
    ema_decay: float = setting(0.9999, "decay of the weights' EMA (the model shipped)")
    ema_warmup: bool = setting(True, "timm's EMA decay warm-up: short runs still get a useful "
                                     "EMA")
    class_weighted_loss: bool = setting(False, "weight the loss with the class_weights step's "
                                               "weights")
    weighted_sampler: bool = setting(True, "sample each image with its class's weight")
    defer_sampler_epochs: int = setting(0, "plain shuffles for the first N epochs, the "
                                           "weighted sampler after (DRS, Cao et al. 2019)")
    logit_adjust_tau: float = setting(0.0, "logit-adjusted loss's tau (Menon et al. 2021; 0 "
                                           "disables)")
    augment: bool = setting(True, "the paper's crops, flips, colour jitter and rotation")
    crop_scale: tuple[float, ...] = setting((0.8, 1.0), "the random resized crop's share of "
                                                        "the image's area, low,high")
    photometric: Photometric = setting("paper", "colour augmentation: the paper's jitter, or "
                                                "strong: + hue, gamma and blur")
    field_of_view: float = setting(0.0, "share of training images cut to a random dermoscope "
                                        "circle (black outside)")
    sampler_balance: SamplerBalance = setting("class", "the weighted sampler balances classes, "
                                                       "or class_site: classes, and the sites "
                                                       "within each class")
    grad_clip: float = setting(0.0, "gradient norm clipping (0 disables)")
    drop_path_rate: float = setting(0.1, "stochastic depth, rising over the blocks")
    num_workers: int | str = setting("auto", "DataLoader workers, or auto: the CPUs this "
                                             "process may use less one, at most 4")
    seed: int = setting(0, "random seed of weights, sampling and augmentation")
    compile: bool = setting(False, "torch.compile the model")
    gpu_resident: GpuResident = setting("auto", "keep the decoded images on the GPU (auto: "
                                                "when they fit)")
    gpu_resident_max_share: float = setting(0.5, "auto: the most of the GPU's free memory the "
                                                 "images may take")
    nodes: int = setting(1, "nodes; nodes x gpus_per_node > 1 trains with DDP on Kubeflow "
                            "Trainer (a TrainJob)")
    gpus_per_node: int = setting(1, "GPUs (DDP processes) per node")
    lr_scaling: LrScaling = setting("linear", "with several processes: linear scales peak_lr "
                                              "by the world size (the effective batch)")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def warm_start(self) -> bool:
        """Whether training starts with the self-supervised pretext: it stands in for
        pretrained weights, so given weights (`pretrained`) take its place."""
        return self.self_supervised_epochs > 0 and self.pretrained is False

    def loader_workers(self) -> int:
        """num_workers, with `auto` resolved on this machine: the CPUs this process may use
        less one for the training loop itself, at most 4 (the paper's setting). Resolved
        here, not when params are read, so a run resumed elsewhere keeps its settings."""
        if self.num_workers != "auto":
            return int(self.num_workers)
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
        return max(0, min(4, usable - 1))

    def check(self) -> None:
        from model import PRESETS

        require(self.preset in PRESETS, self, "preset", f"must be one of {sorted(PRESETS)}")
        for key in ("dims", "depths"):
            value = getattr(self, key)
            require(value is None or (len(value) == 4 and min(value) >= 1), self, key,
                     "must be 4 positive integers (one per stage) or null")
        # The 4x4/4 stem must tile the image; a 2x2 downsampling (seed-readme) halves it
        # exactly three more times.
        multiple = 32 if PRESETS[self.preset].get("downsample_kernel") == 2 else 4
        require(self.img_size >= 32 and self.img_size % multiple == 0, self, "img_size",
                 f"must be at least 32 and a multiple of {multiple} for preset {self.preset}")
        for key in ("epochs", "batch_size"):
            require(getattr(self, key) >= 1, self, key, "must be at least 1")
        for key in ("peak_lr", "warmup_lr", "min_lr"):
            value = getattr(self, key)
            require(math.isfinite(value) and value >= 0, self, key,
                     "must be a finite number >= 0")
        require(self.peak_lr > 0, self, "peak_lr", "must be above 0")
        for key in ("warmup_epochs", "defer_sampler_epochs", "self_supervised_epochs"):
            require(getattr(self, key) >= 0, self, key, "must be >= 0")
        require(self.num_workers == "auto" or isinstance(self.num_workers, int)
                 and self.num_workers >= 0, self, "num_workers", "must be auto or >= 0")
        require(self.defer_sampler_epochs < self.epochs or not self.weighted_sampler, self,
                 "defer_sampler_epochs", f"must be below epochs ({self.epochs}): the weighted "
                 f"sampler would never start")
        for key in ("momentum", "ema_decay", "drop_path_rate"):
            require(0 <= getattr(self, key) < 1, self, key, "must be in [0, 1)")
        for key in ("weight_decay", "mixup_alpha", "grad_clip", "logit_adjust_tau"):
            value = getattr(self, key)
            require(math.isfinite(value) and value >= 0, self, key,
                     "must be a finite number >= 0")
        low_high = len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1
        require(low_high, self, "crop_scale", "must be two numbers, 0 < low <= high <= 1")
        require(0 <= self.field_of_view <= 1, self, "field_of_view", "must be in [0, 1]")
        require(0 < self.gpu_resident_max_share <= 1, self, "gpu_resident_max_share",
                 "must be in (0, 1]")
        for key in ("nodes", "gpus_per_node"):
            require(getattr(self, key) >= 1, self, key, "must be at least 1")
        require(self.sampler_balance == "class" or self.weighted_sampler, self,
                 "sampler_balance", "class_site needs weighted_sampler: true (it shapes the "
                 "weighted sampler's draws)")

    def for_overfit(self) -> "TrainConfig":
        """Memorise a few images: no augmentation, mixup, drop path, sampler or weight decay."""
        return dataclasses.replace(self, augment=False, mixup_alpha=0.0, drop_path_rate=0.0,
                                   weighted_sampler=False, sampler_balance="class",
                                   weight_decay=0.0)


@dataclass
class EvaluateConfig(StepConfig):
    SECTION = "evaluate"
    batch_size: int = setting(64, "images per forward pass")
    tta: bool = setting(False, "average the predictions of the four flips of each image")
    bootstrap: int = setting(1000, "bootstrap resamples for the 95% intervals (0 disables)")
    seed: int = setting(0, "the bootstrap's random seed")
    melanoma_specificity: float = setting(0.9, "report MEL-vs-rest sensitivity (and its "
                                               "threshold) at this specificity")

    def check(self) -> None:
        require(self.batch_size >= 1, self, "batch_size", "must be at least 1")
        require(self.bootstrap >= 0, self, "bootstrap", "must be >= 0")
        require(0 < self.melanoma_specificity < 1, self, "melanoma_specificity",
                 "must be between 0 and 1")


# The test metrics a gate (register) or promote can compare, and which way is better: True
# where lower is better. The names are evaluate's headline metrics (evaluation/metrics.py
# HEADLINE; tests/test_register.py checks they agree); both register and promote read this.
GATE_METRICS = {name: name == "ece" for name in (
    "accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro",
    "precision_weighted", "recall_weighted", "f1_weighted", "roc_auc_macro", "top2_accuracy",
    "ece")}


def lower_is_better(metric: str) -> bool:
    """True when a smaller value of gate metric `metric` is the better one (ECE)."""
    return GATE_METRICS[metric]


@dataclass
class RegisterConfig(StepConfig):
    SECTION = "register"
    model_name: str = setting("skin-lesion-hybrid", "registered model name")
    gate_metric: str = setting("balanced_accuracy", "the test metric the gate compares")
    gate_threshold: float = setting(0.0, "register only when gate_metric clears this")
    min_delta: float = setting(0.0, "promote: the challenger must beat the champion's "
                                    "gate_metric by more than this")
    retries: int = setting(4, "connection retries of register and promote")
    backoff_s: float = setting(2.0, "the first retry's wait; doubles each retry")

    def check(self) -> None:
        require(bool(self.model_name.strip()), self, "model_name", "must not be empty")
        require(self.gate_metric in GATE_METRICS, self, "gate_metric",
                 f"must be one of {sorted(GATE_METRICS)}")
        require(math.isfinite(self.gate_threshold), self, "gate_threshold",
                 "must be a finite number")
        require(math.isfinite(self.min_delta) and self.min_delta >= 0, self, "min_delta",
                 "must be a finite number >= 0")
        require(self.retries >= 0, self, "retries", "must be >= 0")
        require(self.backoff_s >= 0, self, "backoff_s", "must be >= 0")


SECTIONS: dict[str, type[StepConfig]] = {
    c.SECTION: c for c in (DataConfig, PreprocessConfig, SplitConfig, ClassWeightsConfig,
                           TrainConfig, EvaluateConfig, RegisterConfig)}
STEP_SECTIONS = ("preprocess", "split", "class_weights", "train", "evaluate", "register")
KUBEFLOW_TASKS = ("materialise", *STEP_SECTIONS)  # and `default`, for the tasks not named
KUBEFLOW_RESOURCES = ("cpu", "memory", "gpu")


def check_layout(params: dict, source: str) -> None:
    """Refuse a section or key that nothing reads and a section that is not a mapping, in
    every section, kubeflow's resources included."""
    check_keys(params, [*SECTIONS, "kubeflow"], "", source)
    for name, section in params.items():
        if section is None:  # an empty section: the defaults
            continue
        check_mapping(section, name, source)
        if name == "kubeflow":
            _check_kubeflow(section, source)
        else:
            check_keys(section, [f.name for f in dataclasses.fields(SECTIONS[name])],
                        f"{name}.", source)


def _check_kubeflow(section: dict, source: str) -> None:
    check_keys(section, ("resources",), "kubeflow.", source)
    resources = section.get("resources") or {}
    check_mapping(resources, "kubeflow.resources", source)
    check_keys(resources, ("default", *KUBEFLOW_TASKS), "kubeflow.resources.", source)
    for task, res in resources.items():
        where = f"kubeflow.resources.{task}"
        check_mapping(res or {}, where, source)
        check_keys(res or {}, KUBEFLOW_RESOURCES, f"{where}.", source)
        for key, value in (res or {}).items():
            if isinstance(value, bool) or not (
                    isinstance(value, int) and value >= 0 if key == "gpu"
                    else isinstance(value, (str, int, float)) and str(value).strip()):
                rule = ("a whole number of GPUs" if key == "gpu" else
                        "a Kubernetes quantity such as \"4\" or 8Gi")
                raise ConfigError(f"{source}: {where}.{key} = {shown(value)}: must be {rule}")


def check_params(params: dict, source: str = "params") -> None:
    """Every section checked as its step will check it: for a command that starts several
    steps (a pipeline, an experiment), so that a bad value stops it before the first step."""
    check_layout(params, source)
    for cls in SECTIONS.values():
        cls.from_dict(params.get(cls.SECTION), source)


def task_resources(params: dict) -> dict[str, dict]:
    """{task: {cpu, memory[, gpu]}} from params.yaml's `kubeflow.resources`: the pipeline's
    pods (requests = limits: the Guaranteed QoS class, and a task that outgrows them fails
    visibly) and, for `train`, each node of a distributed TrainJob."""
    kubeflow = params.get("kubeflow") or {}
    check_mapping(kubeflow, "kubeflow", "params")
    _check_kubeflow(kubeflow, "params")
    resources = kubeflow.get("resources") or {}
    default = resources.get("default") or {"cpu": "1", "memory": "2Gi"}
    return {"default": default, **{task: {**default, **(resources.get(task) or {})}
                                   for task in KUBEFLOW_TASKS}}
