"""One config loader: params.yaml and the code's defaults agree, every step's section is read
the same way, KFP's float-for-int Struct values are undone once, bad values are refused."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from components.common.config import (SECTIONS, ConfigError, EvaluateConfig, TrainConfig,
                                      load_params, parse_params)

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_and_code_defaults_agree():
    params = load_params(ROOT / "params.yaml")
    for name, cls in SECTIONS.items():
        section = params[name]
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(section) == fields, f"{name}: params.yaml keys differ from {cls.__name__}"
        assert cls.from_dict(section) == cls(), f"{name}: params.yaml values differ from the code"


def test_params_yaml_holds_values_and_each_key_is_explained_once():
    """params.yaml holds values and short notes on why a default was chosen; what a key means
    is its field's help (the flags' help), not repeated there, and measured numbers live in
    benchmarks/RESULTS.md, where the notes point."""
    import re

    helps = {f"{cls.SECTION}.{f.name}": f.metadata["help"] for cls in SECTIONS.values()
             for f in dataclasses.fields(cls)}
    section = None
    for number, line in enumerate((ROOT / "params.yaml").read_text().splitlines(), 1):
        code, _, comment = line.partition("#")
        if re.match(r"^\w", code):
            section = code.split(":")[0]
        key = re.match(r"^  (\w+):", code)
        if key and comment:
            help_ = helps[f"{section}.{key.group(1)}"]
            words = set(re.findall(r"[a-z]{4,}", help_.lower()))
            shared = words & set(re.findall(r"[a-z]{4,}", comment.lower()))
            assert len(shared) < max(2, len(words) / 2), f"params.yaml:{number} repeats the help"
        assert not re.search(r"\b0\.\d{3}\b", comment), f"params.yaml:{number}: a measured number"


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
    ("gpu_resident", "maybe", "one of auto, on, off"), ("dims", (8, 16), "4 positive"),
])
def test_bad_training_values_are_refused_naming_the_key(key, value, rule):
    with pytest.raises(ConfigError, match=rf"train\.{key}.*{rule}"):
        TrainConfig.from_dict({key: value}, "test")


def test_unknown_keys_and_sections_name_their_source(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=rf"{bad}: unknown key train\.epoch; known: preset"):
        TrainConfig.resolve(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="not sections"):
        load_params(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="evaluate.batch_size"):
        EvaluateConfig.from_dict({"batch_size": -1})


# -- YAML 1.1's booleans in choice keys (issue 24, item 8) -----------------------------------
def _choice_keys() -> dict[str, tuple[str, ...]]:
    return {f"{cls.SECTION}.{name}": options for cls in SECTIONS.values()
            for name, options in cls.choices().items()}


def test_every_choice_key_is_declared_and_only_gpu_resident_takes_on_off():
    choices = _choice_keys()
    assert set(choices) >= {"preprocess.color_constancy", "split.mode", "class_weights.method",
                            "train.gpu_resident", "train.lr_scaling"}
    assert [k for k, c in choices.items() if {"on", "off"} & set(c)] == ["train.gpu_resident"]


def test_every_choice_survives_dvcs_rewrite_of_params_yaml():
    """`dvc exp run -S` rewrites params.yaml with its own YAML 1.2 writer: each choice of each
    choice key must read back as itself (on, off: not booleans), and train.preset's too."""
    from dvc.utils.serialize import dumps_yaml

    from model import PRESETS

    written = [(cls, key, value) for cls in SECTIONS.values()
               for key, options in cls.choices().items() for value in options]
    written += [(TrainConfig, "preset", name) for name in PRESETS]
    for cls, key, value in written:
        needs = {"test_sources": ["BCN"]} if value == "source" else {}  # split.mode source
        params = parse_params(dumps_yaml({cls.SECTION: {key: value, **needs}}), "dvc")
        assert getattr(cls.resolve(params), key) == value, f"{cls.SECTION}.{key}: {value}"


@pytest.mark.parametrize("spelling,value", [("on", "on"), ("ON", "on"), ("yes", "on"),
                                            ("true", "on"), ("off", "off"), ("no", "off"),
                                            ('"on"', "on"), ("auto", "auto")])
def test_yaml_booleans_read_as_on_off_for_gpu_resident(tmp_path, spelling, value):
    """DVC rewrites params.yaml with `on` unquoted (YAML 1.2), which PyYAML (1.1) reads as
    True: the unquoted spellings must mean the documented choices."""
    from dvc.utils.serialize import dumps_yaml

    from components.common.cli_args import parse_assignment

    assert dumps_yaml({"train": {"gpu_resident": "on"}}) == "train:\n  gpu_resident: on\n"
    params = tmp_path / "params.yaml"
    params.write_text(f"train:\n  gpu_resident: {spelling}\n")
    assert TrainConfig.resolve(params).gpu_resident == value
    key, parsed = parse_assignment(f"train.gpu_resident={spelling}")
    assert TrainConfig.from_dict({"gpu_resident": parsed}).gpu_resident == value


def test_a_boolean_in_another_choice_key_says_to_quote_it():
    with pytest.raises(ConfigError, match=r"split\.mode = True: must be one of grouped, folds, "
                                          r"paper, source \(unquoted on/off/yes/no"):
        SECTIONS["split"].from_dict({"mode": True})


# -- the dataclasses are the one description of a setting (issue 26, item 3) ---------------
def test_each_choice_list_is_written_once():
    """A choice list (gpu_resident's auto/on/off, split's modes, ...) is the `Literal` of its
    config field and nowhere else: flags, checks and docs read it from there."""
    import re

    code = [p for d in ("components", "pipeline", "benchmarks", "docs", "image")
            for p in (ROOT / d).rglob("*.py")]
    for key, options in _choice_keys().items():
        written = re.compile(r"""['"]\s*,\s*['"]""".join(map(re.escape, options)))
        where = [str(p.relative_to(ROOT)) for p in code if written.search(p.read_text())]
        assert where == ["components/common/config.py"], f"{key}: {options} written in {where}"


STEPS = ("preprocess", "split", "class_weights", "train", "evaluate", "register")
# Flags a step declares itself, with help of its own: train's TrainJob group (which is
# leaving components/ for pipeline/, issue 26 item 2).
OWN_HELP = {"train.nodes", "train.gpus_per_node"}


@pytest.mark.parametrize("step", STEPS)
def test_every_setting_is_a_flag_of_its_step_with_the_fields_help(step, monkeypatch, capsys):
    """Each step's flags for its section are made from the dataclass: every key a flag, its
    help the field's help, its choices the field's Literal."""
    import importlib
    import re

    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: the help is not wrapped
    with pytest.raises(SystemExit):
        importlib.import_module(f"components.{step}").main(["--help"])
    entries = re.split(r"\n(?=\s+-)", capsys.readouterr().out)  # one per option, help and all
    cls = SECTIONS[step]
    for field in dataclasses.fields(cls):
        help_ = field.metadata["help"]
        line = next((" ".join(x.split()) for x in entries
                     if re.match(rf"\s+--{field.name}(?![\w-])", x)), None)
        assert line is not None, f"{step}: no --{field.name}"
        assert help_ in line or f"{step}.{field.name}" in OWN_HELP, f"{step} --{field.name}: {line.strip()!r} lacks {help_!r}"
        if field.name in cls.choices():
            assert "{" + ",".join(cls.choices()[field.name]) + "}" in line


def _benchmark_main(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


OVERRIDING = {  # every command that takes overrides, with the arguments it requires
    "exp run": ("components.commands.experiments", ["run"]),
    "pipeline submit": ("pipeline.cli", ["submit", "--host", "http://kfp"]),
    "pipeline run-local": ("pipeline.cli", ["run-local"]),
    "ham10000": ("ham10000", ["--out", "o"]),
    "cross_site": ("cross_site", ["--labels", "l", "--images", "i", "--metadata", "m",
                                  "--out", "o"]),
}


@pytest.mark.parametrize("command", OVERRIDING)
def test_every_command_takes_overrides_as_dash_S_and_nothing_else(command, capsys):
    """One grammar: `-S/--set SECTION.KEY=VALUE`, repeatable; the old `--param` is refused,
    not taken for an abbreviation of --params or --params_file."""
    import importlib

    module, argv = OVERRIDING[command]
    main = (importlib.import_module(module).main if "." in module else _benchmark_main(module))
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    assert "-S SECTION.KEY=VALUE" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*argv, "--param", "train.epochs=2"])
    assert "unrecognized arguments: --param" in capsys.readouterr().err


# -- one loader, hostile params files (issue 24, item 12) ------------------------------------
LAUGHS = "train:\n  dims: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"  x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9))


def test_a_billion_laughs_file_is_refused_at_once_in_one_short_line(tmp_path):
    import time

    bad = tmp_path / "laughs.yaml"
    bad.write_text(LAUGHS)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_params(bad)
    assert time.perf_counter() - start < 0.5
    message = str(err.value)
    assert str(bad) in message and "anchor" in message and "\n" not in message
    assert len(message) < 300


@pytest.mark.parametrize("text,named", [
    ("kubeflow:\n  resorces: {}\n", "kubeflow.resorces"),
    ("kubeflow:\n  resources:\n    trian: {cpu: '1'}\n", "kubeflow.resources.trian"),
    ("kubeflow:\n  resources:\n    train: {cpu: '1', gpus: 1}\n", "kubeflow.resources.train.gpus"),
    ("kubeflow:\n  resources:\n    train: 4\n", "kubeflow.resources.train"),
    ("kubeflow:\n  resources:\n    train: {gpu: many}\n", "kubeflow.resources.train.gpu"),
    ("kubeflow: 5\n", "kubeflow"),
    ("train: 5\n", "train"),
    ("train: [1, 2]\n", "train"),
    ("trian:\n  epochs: 3\n", "trian"),
    ("train:\n  epoch: 3\n", "train.epoch"),
    ("split:\n  nested: {deep: 1}\n", "split.nested"),
    ("train:\n  dims: " + "[" * 200 + "]" * 200 + "\n", "nested"),
    ("train: {epochs: 1\n", "not valid YAML at line 2"),
    ("# " + "x" * (64 << 10) + "\n", "is over 64 KiB"),
    ("train:\n  epochs: 3\n  epochs: 4\n", "line 3, column 3: key 'epochs' is given twice"),
    ("train:\n  epochs: " + "9" * 5000 + "\n", "not valid YAML"),
])
def test_bad_params_files_are_refused_in_one_line_naming_file_and_key(tmp_path, text, named):
    bad = tmp_path / "p.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_params(bad)
    message = str(err.value)
    assert str(bad) in message and named in message and "\n" not in message, message


def test_error_messages_never_echo_a_huge_value(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("train:\n  dims: [" + ", ".join(["1"] * 20_000) + "]\n")
    with pytest.raises(ConfigError) as err:
        TrainConfig.resolve(bad)
    assert "train.dims" in str(err.value) and len(str(err.value)) < 400
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"preset": "x" * 100_000})
    assert "train.preset" in str(err.value) and len(str(err.value)) < 400


def test_the_committed_text_of_a_params_file_goes_through_the_same_checks():
    with pytest.raises(ConfigError, match=r"git HEAD:params.yaml is over 64 KiB"):
        parse_params("#" * (65 << 10), "git HEAD:params.yaml")
    with pytest.raises(ConfigError, match=r"git HEAD:params.yaml: unknown key kubeflow.resorces"):
        parse_params("kubeflow:\n  resorces: {}\n", "git HEAD:params.yaml")
