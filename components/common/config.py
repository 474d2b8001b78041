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
value and where it came from, before any work starts. Every params file is read by
`load_params` (components.common.params_yaml's safe loader: no aliases, bounded size and depth),
which refuses unknown sections and keys; `check_params` checks every section at once, for the
commands that start several steps.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

# ConfigError, committed_text and deep_merge are this module's API as well
from components.common.params_yaml import (ConfigError, committed_text, deep_merge, parse_yaml,
                                           read_text, shown)

PARAMS_FILE = "params.yaml"
CLASS_WEIGHT_METHODS = ("balanced", "sqrt", "effective_number")  # training/balance.py
COLOR_CONSTANCY = ("none", "shades_of_gray")                      # common/images.py


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
        raise ConfigError(f"{where}: {shown(value)} is not a {kind}")
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {shown(value)}")
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
    raise ConfigError(f"{where}: {shown(value)} is not a {getattr(kind, '__name__', kind)}")


def choice(default: str, *others: str):
    """A str field that takes one of a few names (`default` first); StepConfig checks it."""
    return dataclasses.field(default=default, metadata={"choices": (default, *others)})


def _choose(choices: tuple[str, ...], value, where: str) -> str:
    """`value` as one of `choices`. YAML 1.1 (PyYAML) reads unquoted on/off/yes/no/true/false
    as booleans, and DVC writes `on` unquoted when it rewrites params.yaml (`dvc exp run -S`):
    for a key whose choices are on/off, a boolean means those."""
    if isinstance(value, bool) and {"on", "off"} <= set(choices):
        return "on" if value else "off"
    if value not in choices:
        hint = (" (unquoted on/off/yes/no/true/false are booleans in YAML: quote the name)"
                if isinstance(value, bool) else "")
        raise ConfigError(f"{where} = {shown(value)}: must be one of {', '.join(choices)}{hint}")
    return value


def _cut(key: Any) -> str:
    text = str(key)
    return text if len(text) <= 40 else text[:40] + "..."


def _check_keys(values: dict, known: Sequence[str], prefix: str, source: str) -> None:
    """Refuse a key nothing reads: a typo (`kubeflow.resorces`) must not be ignored silently."""
    if unknown := sorted(map(str, set(values) - set(known))):
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ConfigError(f"{source}: unknown key {prefix}{_cut(unknown[0])}{more}; "
                          f"known: {', '.join(known)}")


def _mapping(value, key: str, source: str) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {key} = {shown(value)} is not a mapping of settings")


class StepConfig:
    """Base of the step configs: reading a section, coercing and checking its values."""
    SECTION: ClassVar[str]

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            where, value = f"{self.SECTION}.{f.name}", getattr(self, f.name)
            if "choices" in f.metadata:
                value = _choose(f.metadata["choices"], value, where)
            setattr(self, f.name, _coerce(hints[f.name], value, where))
        self.check()

    def check(self) -> None:
        """Raise ConfigError for a value the step cannot use (subclasses add their rules)."""

    @classmethod
    def from_dict(cls, values: dict, source: str = "arguments"):
        """The config from a section's values (None: the default); unknown keys are errors."""
        values = {} if values is None else values
        _mapping(values, cls.SECTION, source)
        values = {k: v for k, v in values.items() if v is not None}
        _check_keys(values, [f.name for f in dataclasses.fields(cls)], f"{cls.SECTION}.", source)
        try:
            return cls(**values)
        except ConfigError as err:
            raise ConfigError(f"{err} (from {source})") from None

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
        _mapping(section, cls.SECTION, source)
        merged = {**section, **{k: v for k, v in overrides.items() if v is not None}}
        return cls.from_dict(merged, source)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _require(ok: bool, cfg: StepConfig, key: str, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{cfg.SECTION}.{key} = {shown(getattr(cfg, key))}: {rule}")


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
    color_constancy: str = choice(*COLOR_CONSTANCY)  # Finlayson & Trezzi 2004
    minkowski_p: float = 6.0       # shades_of_gray's norm

    def check(self) -> None:
        _require(self.size >= 32, self, "size", "must be at least 32")
        _require(self.minkowski_p >= 1, self, "minkowski_p", "must be at least 1")


@dataclass
class SplitConfig(StepConfig):
    SECTION = "split"
    mode: str = choice("grouped", "folds", "paper", "source")  # components/split.py
    seed: int = 0
    val_frac: float = 0.15
    test_frac: float = 0.15
    test_sources: tuple[str, ...] = ()   # mode source: the sources held out as test
    accept_relabel: bool = False         # accept kept images relabelled since --previous

    def check(self) -> None:
        _require(self.mode != "source" or bool(self.test_sources), self, "test_sources",
                 "mode source needs at least one test source (e.g. [BCN])")
        for key in ("val_frac", "test_frac"):
            _require(0 < getattr(self, key) < 1, self, key, "must be between 0 and 1")
        _require(self.val_frac + self.test_frac < 1, self, "test_frac",
                 f"val_frac + test_frac must be below 1 (val_frac is {self.val_frac})")


@dataclass
class ClassWeightsConfig(StepConfig):
    SECTION = "class_weights"
    method: str = choice(*CLASS_WEIGHT_METHODS)  # components.class_weights
    beta: float = 0.999            # effective_number's beta (Cui et al. 2019)

    def check(self) -> None:
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
    gpu_resident: str = choice("auto", "on", "off")
    gpu_resident_max_share: float = 0.5
    nodes: int = 1                   # > 1, or gpus_per_node > 1: a Kubeflow Trainer TrainJob
    gpus_per_node: int = 1
    lr_scaling: str = choice("linear", "none")  # linear: lr x world size (effective batch)

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
        _require(0 < self.gpu_resident_max_share <= 1, self, "gpu_resident_max_share",
                 "must be in (0, 1]")
        for key in ("nodes", "gpus_per_node"):
            _require(getattr(self, key) >= 1, self, key, "must be at least 1")

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
    model_name: str = "skin-lesion-hybrid"
    gate_metric: str = "balanced_accuracy"
    gate_threshold: float = 0.0    # register only when the test metric clears this
    min_delta: float = 0.0         # promote: challenger must beat the champion by more
    retries: int = 4               # connection retries of register/promote
    backoff_s: float = 2.0         # first wait; doubles each retry (2, 4, 8, 16 s)

    def check(self) -> None:
        _require(bool(self.model_name.strip()), self, "model_name", "must not be empty")
        _require(self.gate_metric in GATE_METRICS, self, "gate_metric",
                 f"must be one of {sorted(GATE_METRICS)}")
        _require(math.isfinite(self.gate_threshold), self, "gate_threshold",
                 "must be a finite number")
        _require(math.isfinite(self.min_delta) and self.min_delta >= 0, self, "min_delta",
                 "must be a finite number >= 0")
        _require(self.retries >= 0, self, "retries", "must be >= 0")
        _require(self.backoff_s >= 0, self, "backoff_s", "must be >= 0")


SECTIONS: dict[str, type[StepConfig]] = {
    c.SECTION: c for c in (DataConfig, PreprocessConfig, SplitConfig, ClassWeightsConfig,
                           TrainConfig, EvaluateConfig, RegisterConfig)}
STEP_SECTIONS = ("preprocess", "split", "class_weights", "train", "evaluate", "register")
KUBEFLOW_TASKS = ("materialise", *STEP_SECTIONS)  # and `default`, for the tasks not named
KUBEFLOW_RESOURCES = ("cpu", "memory", "gpu")


def check_layout(params: dict, source: str) -> None:
    """Refuse a section or key that nothing reads and a section that is not a mapping, in
    every section, kubeflow's resources included."""
    _check_keys(params, [*SECTIONS, "kubeflow"], "", source)
    for name, section in params.items():
        if section is None:  # an empty section: the defaults
            continue
        _mapping(section, name, source)
        if name == "kubeflow":
            _check_kubeflow(section, source)
        else:
            _check_keys(section, [f.name for f in dataclasses.fields(SECTIONS[name])],
                        f"{name}.", source)


def _check_kubeflow(section: dict, source: str) -> None:
    _check_keys(section, ("resources",), "kubeflow.", source)
    resources = section.get("resources") or {}
    _mapping(resources, "kubeflow.resources", source)
    _check_keys(resources, ("default", *KUBEFLOW_TASKS), "kubeflow.resources.", source)
    for task, res in resources.items():
        where = f"kubeflow.resources.{task}"
        _mapping(res or {}, where, source)
        _check_keys(res or {}, KUBEFLOW_RESOURCES, f"{where}.", source)
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
    _mapping(kubeflow, "kubeflow", "params")
    _check_kubeflow(kubeflow, "params")
    resources = kubeflow.get("resources") or {}
    default = resources.get("default") or {"cpu": "1", "memory": "2Gi"}
    return {"default": default, **{task: {**default, **(resources.get(task) or {})}
                                   for task in KUBEFLOW_TASKS}}
