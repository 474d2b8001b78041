"""One config loader: params.yaml and the code's defaults agree, every step's section is read
the same way, KFP's float-for-int Struct values are undone once, bad values are refused."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from components.common.config import (SECTIONS, ConfigError, EvaluateConfig, TrainConfig,
                                      load_params)

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_and_code_defaults_agree():
    params = load_params(ROOT / "params.yaml")
    for name, cls in SECTIONS.items():
        section = params[name]
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(section) == fields, f"{name}: params.yaml keys differ from {cls.__name__}"
        assert cls.from_dict(section) == cls(), f"{name}: params.yaml values differ from the code"


def test_partial_files_merge_over_the_base():
    merged = load_params([ROOT / "params.yaml", ROOT / "params.demo.yaml"])
    cfg = TrainConfig.resolve(merged, epochs=2)
    assert cfg.img_size == 64 and cfg.dims == (32, 64, 96, 128) and cfg.epochs == 2
    assert cfg.momentum == 0.9  # untouched keys keep params.yaml's value


def test_kfp_struct_floats_become_ints_once():
    cfg = TrainConfig.from_dict({"epochs": 3.0, "dims": [8.0, 16.0, 24.0, 32.0], "peak_lr": 1})
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert cfg.dims == (8, 16, 24, 32) and all(isinstance(d, int) for d in cfg.dims)
    assert cfg.peak_lr == 1.0 and isinstance(cfg.peak_lr, float)
    assert TrainConfig.from_dict({"warmup_lr": "1e-5"}).warmup_lr == 1e-5  # YAML's string
    with pytest.raises(ConfigError, match="train.epochs"):
        TrainConfig.from_dict({"epochs": 2.5})


@pytest.mark.parametrize("key,value,rule", [
    ("peak_lr", float("nan"), "finite"), ("peak_lr", 0.0, "above 0"), ("epochs", 0, "at least 1"),
    ("img_size", 7, "at least 32"), ("img_size", 50, "multiple of 4"),
    ("weight_decay", -1.0, ">= 0"), ("ema_decay", 1.5, r"\[0, 1\)"), ("batch_size", 0, "at least 1"),
    ("gpu_resident", "maybe", "auto, on or off"), ("dims", (8, 16), "4 positive"),
])
def test_bad_training_values_are_refused_naming_the_key(key, value, rule):
    with pytest.raises(ConfigError, match=rf"train\.{key}.*{rule}"):
        TrainConfig.from_dict({key: value}, "test")


def test_unknown_keys_and_sections_name_their_source(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=rf"unknown train settings \['epoch'\].*{bad}"):
        TrainConfig.resolve(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="not sections"):
        load_params(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="evaluate.batch_size"):
        EvaluateConfig.from_dict({"batch_size": -1})
