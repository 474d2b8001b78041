"""params.yaml, read in one place: each step's typed settings, with their defaults.

Every step reads its own section of params.yaml (the DVC example-get-started rule) into the
dataclass below, whatever runs it: the DVC stage and the CLI (`--params params.yaml
[--params_file params.demo.yaml ...]`), the KFP component (the section arrives as a dict
through a protobuf Struct, where every number is a float: `from_dict` turns 100.0 back into
100 from the field's type, here and nowhere else) and the tests. The defaults here and
params.yaml agree (tests/test_config.py checks it), so a step run without a params file
behaves as `dvc repro` does.

    cfg = TrainConfig.resolve(load_params(["params.yaml", "params.demo.yaml"]), epochs=3)

Values are checked when a config is made: a bad one is a ConfigError naming the key, the
value and where it came from, before any work starts.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import subprocess
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import yaml

PARAMS_FILE = "params.yaml"
CLASS_WEIGHT_METHODS = ("balanced", "sqrt", "effective_number")  # training/balance.py
COLOR_CONSTANCY = ("none", "shades_of_gray")                      # common/images.py


class ConfigError(ValueError):
    """A params file or setting that cannot be used; the message names key, value and source."""


# -- params files ---------------------------------------------------------------------------
def deep_merge(base: dict, override: dict) -> dict:
    """`override` over `base`, recursively for dicts; neither input is modified."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_params(text: str, source: str) -> dict:
    """One params file's text as a dict (empty text is {}); a clear error for anything else."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"params file {source} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"params file {source} holds a {type(data).__name__}, not sections")
    return data


def read_yaml(path: str | os.PathLike) -> dict:
    """One params file as a dict."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"params file {path} does not exist") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"params file {path} is not UTF-8 text: {err}") from None
    return parse_params(text, str(path))


def committed_text(path: str | os.PathLike) -> str | None:
    """The file's text at git HEAD (what experiments and pipelines start from), or None outside
    a git checkout (an installed image) or when the file is not committed."""
    path = Path(path)
    try:
        return subprocess.run(["git", "show", f"HEAD:./{path.name}"], cwd=path.parent,
                              capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def load_params(paths: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> dict:
    """The params files merged in order: a full params.yaml first, partial override files
    (params.demo.yaml, params.paper.yaml) after it. None: ./params.yaml when there is one."""
    if paths is None:
        paths = [PARAMS_FILE] if Path(PARAMS_FILE).is_file() else []
    elif isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    params: dict = {}
    for path in paths:
        params = deep_merge(params, read_yaml(path))
    return params


# -- one step's section ---------------------------------------------------------------------
def _coerce(kind, value, where: str):
    """`value` as the field type `kind`: what YAML, argparse and KFP's Struct hand over."""
    if value is None:
        if kind is type(None) or type(None) in typing.get_args(kind):
            return None
        raise ConfigError(f"{where}: a value is required")
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not a {kind}")
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, where) for v in value)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, float) and value.is_integer():  # KFP's Struct: 100 -> 100.0
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        # PyYAML reads 1e-5 (no dot) as a string; argparse and KFP give numbers.
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where}: {value!r} is not a {getattr(kind, '__name__', kind)}")


class StepConfig:
    """Base of the step configs: reading a section, coercing and checking its values."""
    SECTION: ClassVar[str]

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            where = f"{self.SECTION}.{f.name}"
            setattr(self, f.name, _coerce(hints[f.name], getattr(self, f.name), where))
        self.check()

    def check(self) -> None:
        """Raise ConfigError for a value the step cannot use (subclasses add their rules)."""

    @classmethod
    def from_dict(cls, values: dict, source: str = "arguments"):
        """The config from a section's values (None: the default); unknown keys are errors."""
        values = {k: v for k, v in (values or {}).items() if v is not None}
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(values) - known):
            raise ConfigError(f"unknown {cls.SECTION} settings {unknown} (from {source}); "
                              f"known: {', '.join(sorted(known))}")
        try:
            return cls(**values)
        except ConfigError as err:
            raise ConfigError(f"{err} (from {source})") from None

    @classmethod
    def resolve(cls, params: dict | str | os.PathLike | Sequence | None = None, **overrides):
        """Defaults <- the params' section <- overrides that are not None.

        params: a params dict (load_params), or params file path(s) to load."""
        source = "params"
        if not isinstance(params, dict):
            source = ", ".join(map(str, params)) if isinstance(params, (list, tuple)) \
                else str(params or PARAMS_FILE)
            params = load_params(params)
        section = params.get(cls.SECTION) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: section {cls.SECTION!r} is not a mapping")
        merged = {**section, **{k: v for k, v in overrides.items() if v is not None}}
        return cls.from_dict(merged, source)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _require(ok: bool, cfg: StepConfig, key: str, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{cfg.SECTION}.{key} = {getattr(cfg, key)!r}: {rule}")


# -- the sections of params.yaml ------------------------------------------------------------
@dataclass
class DataConfig(StepConfig):
    SECTION = "data"
    raw: str = "data/raw"          # images/, labels.csv, metadata.csv (tracked by data/raw.dvc)


@dataclass
class PreprocessConfig(StepConfig):
    SECTION = "preprocess"
    size: int = 256                # short side after resizing once; train crops 224 from it
    skip_corrupt: bool = False     # list bad files in the report and leave them out
    color_constancy: str = "none"  # none | shades_of_gray (Finlayson & Trezzi 2004)
    minkowski_p: float = 6.0       # shades_of_gray's norm

    def check(self) -> None:
        _require(self.size >= 32, self, "size", "must be at least 32")
        _require(self.color_constancy in COLOR_CONSTANCY, self, "color_constancy",
                 "must be none or shades_of_gray")
        _require(self.minkowski_p >= 1, self, "minkowski_p", "must be at least 1")


@dataclass
class SplitConfig(StepConfig):
    SECTION = "split"
    mode: str = "grouped"          # grouped (by lesion_id) | paper (image-level) | source
    seed: int = 0
    val_frac: float = 0.15
    test_frac: float = 0.15
    test_sources: tuple[str, ...] = ()   # mode source: the sources held out as test

    def check(self) -> None:
        _require(self.mode in ("grouped", "paper", "source"), self, "mode",
                 "must be grouped, paper or source")
        _require(self.mode != "source" or bool(self.test_sources), self, "test_sources",
                 "mode source needs at least one test source (e.g. [BCN])")
        for key in ("val_frac", "test_frac"):
            _require(0 < getattr(self, key) < 1, self, key, "must be between 0 and 1")
        _require(self.val_frac + self.test_frac < 1, self, "test_frac",
                 f"val_frac + test_frac must be below 1 (val_frac is {self.val_frac})")


@dataclass
class ClassWeightsConfig(StepConfig):
    SECTION = "class_weights"
    method: str = "balanced"       # balanced | sqrt | effective_number (components.class_weights)
    beta: float = 0.999            # effective_number's beta (Cui et al. 2019)

    def check(self) -> None:
        _require(self.method in CLASS_WEIGHT_METHODS, self, "method",
                 f"must be one of {CLASS_WEIGHT_METHODS}")
        _require(0 <= self.beta < 1, self, "beta", "must be in [0, 1)")


@dataclass
class TrainConfig(StepConfig):
    """The training recipe. Defaults: the paper's (Ozdemir & Pacal 2025), except the class
    balancing, which the HAM10000 recipe study chose (params.yaml says why)."""
    SECTION = "train"
    preset: str = "paper"
    pretrained: bool | str = False   # True: ImageNet ConvNeXtV2-base from the hub; or a path
    dims: tuple[int, ...] | None = None     # override the preset's widths (narrow models)
    depths: tuple[int, ...] | None = None
    img_size: int = 224
    epochs: int = 100
    batch_size: int = 32             # per process
    peak_lr: float = 0.01
    warmup_epochs: int = 5
    warmup_lr: float = 1e-5
    min_lr: float = 1e-6
    momentum: float = 0.9
    weight_decay: float = 2e-5
    mixup_alpha: float = 0.4         # 0 disables mixup
    ema_decay: float = 0.9999
    ema_warmup: bool = True          # timm's decay warm-up: short runs still get a useful EMA
    class_weighted_loss: bool = False  # loss weights from the class_weights step
    weighted_sampler: bool = True     # sample each image with its class's weight
    defer_sampler_epochs: int = 0     # plain shuffles for the first N epochs (DRS, Cao 2019)
    logit_adjust_tau: float = 0.0     # logit-adjusted loss (Menon et al. 2021); 0 disables
    augment: bool = True
    grad_clip: float = 0.0           # 0 disables clipping
    drop_path_rate: float = 0.1
    num_workers: int | str = "auto"  # DataLoader workers; auto: loader_workers()
    seed: int = 0
    compile: bool = False
    gpu_resident: str = "auto"       # auto | on | off
    gpu_resident_max_share: float = 0.5
    nodes: int = 1                   # > 1, or gpus_per_node > 1: a Kubeflow Trainer TrainJob
    gpus_per_node: int = 1
    lr_scaling: str = "linear"       # linear: lr x world size (effective batch); none

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

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

        _require(self.preset in PRESETS, self, "preset", f"must be one of {sorted(PRESETS)}")
        for key in ("dims", "depths"):
            value = getattr(self, key)
            _require(value is None or (len(value) == 4 and min(value) >= 1), self, key,
                     "must be 4 positive integers (one per stage) or null")
        # The 4x4/4 stem must tile the image; a 2x2 downsampling (seed-readme) halves it
        # exactly three more times.
        multiple = 32 if PRESETS[self.preset].get("downsample_kernel") == 2 else 4
        _require(self.img_size >= 32 and self.img_size % multiple == 0, self, "img_size",
                 f"must be at least 32 and a multiple of {multiple} for preset {self.preset}")
        for key in ("epochs", "batch_size"):
            _require(getattr(self, key) >= 1, self, key, "must be at least 1")
        for key in ("peak_lr", "warmup_lr", "min_lr"):
            value = getattr(self, key)
            _require(math.isfinite(value) and value >= 0, self, key,
                     "must be a finite number >= 0")
        _require(self.peak_lr > 0, self, "peak_lr", "must be above 0")
        for key in ("warmup_epochs", "defer_sampler_epochs"):
            _require(getattr(self, key) >= 0, self, key, "must be >= 0")
        _require(self.num_workers == "auto" or isinstance(self.num_workers, int)
                 and self.num_workers >= 0, self, "num_workers", "must be auto or >= 0")
        _require(self.defer_sampler_epochs < self.epochs or not self.weighted_sampler, self,
                 "defer_sampler_epochs", f"must be below epochs ({self.epochs}): the weighted "
                 f"sampler would never start")
        for key in ("momentum", "ema_decay", "drop_path_rate"):
            _require(0 <= getattr(self, key) < 1, self, key, "must be in [0, 1)")
        for key in ("weight_decay", "mixup_alpha", "grad_clip", "logit_adjust_tau"):
            value = getattr(self, key)
            _require(math.isfinite(value) and value >= 0, self, key,
                     "must be a finite number >= 0")
        _require(self.gpu_resident in ("auto", "on", "off"), self, "gpu_resident",
                 "must be auto, on or off")
        _require(0 < self.gpu_resident_max_share <= 1, self, "gpu_resident_max_share",
                 "must be in (0, 1]")
        for key in ("nodes", "gpus_per_node"):
            _require(getattr(self, key) >= 1, self, key, "must be at least 1")
        _require(self.lr_scaling in ("linear", "none"), self, "lr_scaling",
                 "must be linear or none")

    def for_overfit(self) -> "TrainConfig":
        """Memorise a few images: no augmentation, mixup, drop path, sampler or weight decay."""
        return dataclasses.replace(self, augment=False, mixup_alpha=0.0, drop_path_rate=0.0,
                                   weighted_sampler=False, weight_decay=0.0)


@dataclass
class EvaluateConfig(StepConfig):
    SECTION = "evaluate"
    batch_size: int = 64
    tta: bool = False              # average the predictions of the four flips of each image
    bootstrap: int = 1000          # resamples for the 95% intervals (0 disables)
    seed: int = 0
    melanoma_specificity: float = 0.9   # MEL-vs-rest operating point reported in metrics.json

    def check(self) -> None:
        _require(self.batch_size >= 1, self, "batch_size", "must be at least 1")
        _require(self.bootstrap >= 0, self, "bootstrap", "must be >= 0")
        _require(0 < self.melanoma_specificity < 1, self, "melanoma_specificity",
                 "must be between 0 and 1")


@dataclass
class RegisterConfig(StepConfig):
    SECTION = "register"
    model_name: str = "skin-lesion-hybrid"
    gate_metric: str = "balanced_accuracy"
    gate_threshold: float = 0.0    # register only when the test metric clears this
    min_delta: float = 0.0         # promote: challenger must beat the champion by more
    retries: int = 4               # connection retries of register/promote
    backoff_s: float = 2.0         # first wait; doubles each retry (2, 4, 8, 16 s)

    def check(self) -> None:
        _require(bool(self.model_name.strip()), self, "model_name", "must not be empty")
        _require(self.retries >= 0, self, "retries", "must be >= 0")
        _require(self.backoff_s >= 0, self, "backoff_s", "must be >= 0")


SECTIONS: dict[str, type[StepConfig]] = {
    c.SECTION: c for c in (DataConfig, PreprocessConfig, SplitConfig, ClassWeightsConfig,
                           TrainConfig, EvaluateConfig, RegisterConfig)}
STEP_SECTIONS = ("preprocess", "split", "class_weights", "train", "evaluate", "register")


def task_resources(params: dict) -> dict[str, dict]:
    """{task: {cpu, memory[, gpu]}} from params.yaml's `kubeflow.resources`: the pipeline's
    pods (requests = limits: the Guaranteed QoS class, and a task that outgrows them fails
    visibly) and, for `train`, each node of a distributed TrainJob."""
    resources = (params.get("kubeflow") or {}).get("resources") or {}
    default = resources.get("default") or {"cpu": "1", "memory": "2Gi"}
    tasks = ("materialise", *STEP_SECTIONS)
    if unknown := sorted(set(resources) - {"default", *tasks}):
        raise ValueError(f"kubeflow.resources: unknown tasks {unknown}; known: {list(tasks)}")
    return {"default": default,
            **{task: {**default, **(resources.get(task) or {})} for task in tasks}}
