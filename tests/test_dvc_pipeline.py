"""dvc.yaml: six stages wired by their files, each stage's params and code declared exactly;
and (slow) on a copy of the project with tiny synthetic data: `dvc exp run` with the override
file runs end to end, a second `dvc repro` does nothing, changing train params reruns train and
what follows only, `dvc exp show` lists the metrics, params.yaml's committed defaults stay."""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import dvc_set_params

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ["preprocess", "split", "class_weights", "train", "evaluate", "register"]


@pytest.fixture(scope="module")
def dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


@pytest.fixture(scope="module")
def params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def _paths(entries) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def _produced(stage: dict) -> list[str]:
    return _paths(stage.get("outs")) + _paths(stage.get("metrics")) + _paths(stage.get("plots"))


def _lookup(tree: dict, dotted: str):
    node = tree
    for key in dotted.split("."):
        node = node[key]
    return node


def test_the_six_stages_and_their_outputs(dvc_yaml):
    stages = dvc_yaml["stages"]
    assert list(stages) == STAGES
    for name, stage in stages.items():
        assert stage["cmd"].startswith(f"python -m components.{name} "), name
    produced = {name: _produced(stage) for name, stage in stages.items()}
    assert all(p.startswith("data/prepared/") for p in produced["preprocess"])
    assert all(p.startswith("data/splits/") for p in produced["split"])
    assert produced["class_weights"] == ["data/class_weights.json"]
    assert all(p.startswith("outputs/train/") for p in produced["train"])
    assert all(p.startswith("outputs/eval/") for p in produced["evaluate"])
    assert produced["register"] == ["outputs/register.json"]
    assert _paths(stages["evaluate"]["metrics"]) == ["outputs/eval/metrics.json"]
    assert _paths(stages["train"]["metrics"]) == ["outputs/train/training_summary.json"]
    curves = {"outputs/eval/roc.csv", "outputs/eval/reliability.csv"}
    assert curves <= set(produced["evaluate"])
    drawn = {path for plot in dvc_yaml["plots"] for spec in plot.values() for path in spec["y"]}
    assert curves <= drawn, "the top-level plots draw the ROC and reliability curves"


def test_stages_are_wired_by_the_files_they_pass(dvc_yaml):
    stages = dvc_yaml["stages"]
    producer = {path: name for name, stage in stages.items() for path in _produced(stage)}

    def upstream(name: str) -> set[str]:
        found = set()
        for dep in _paths(stages[name]["deps"]):
            for path, stage in producer.items():
                if dep == path or path.startswith(dep.rstrip("/") + "/") or dep.startswith(path + "/"):
                    found.add(stage)
        return found

    assert {name: upstream(name) for name in STAGES} == {
        "preprocess": set(), "split": set(), "class_weights": {"split"},
        "train": {"preprocess", "split", "class_weights"},
        "evaluate": {"train", "preprocess", "split"},
        "register": {"train", "evaluate", "split"},
    }
    # every path a command reads is a dependency, every path it writes an output
    for name, stage in stages.items():
        mentioned = set(re.findall(r"(?:data|outputs)/[\w./-]+", stage["cmd"]))
        declared = set(_paths(stage["deps"])) | set(_produced(stage))
        for path in mentioned:
            assert any(path == d or d.startswith(path.rstrip("/") + "/") for d in declared), (
                f"{name}: {path} in the command is neither a dep nor an out")
    for name in ("preprocess", "split"):
        assert {"data/raw/labels.csv"} <= set(_paths(stages[name]["deps"]))


def test_params_are_declared_and_exist_in_params_yaml(dvc_yaml, params):
    stages = dvc_yaml["stages"]
    for name, stage in stages.items():
        declared = stage.get("params") or []
        assert all(isinstance(p, str) for p in declared), f"{name}: params come from params.yaml only"
        for key in declared:
            _lookup(params, key)  # KeyError when absent
        for key in re.findall(r"\$\{([\w.]+)\}", stage["cmd"]):
            _lookup(params, key)
            assert key in declared, f"{name}: ${{{key}}} is used but not declared"
    assert "train" in stages["train"]["params"], "train reads the whole section (--config)"
    assert "evaluate" in stages["evaluate"]["params"], "evaluate reads its section (--params)"
    assert {"register", "preprocess.size"} <= set(stages["register"]["params"])
    for name in ("class_weights",):
        assert not stages[name].get("params")


def _project_imports(module: str) -> set[str]:
    """Files of the project modules `module` imports, transitively (components/, model/)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        path = ROOT / (name.replace(".", "/") + ".py")
        if not path.is_file():
            path = ROOT / name.replace(".", "/") / "__init__.py"
        if not path.is_file() or path in seen:
            continue
        seen.add(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                todo += [base] + [f"{base}.{a.name}" for a in node.names]
    return {str(p.relative_to(ROOT)) for p in seen} - {"components/__init__.py"}


def test_each_stage_depends_on_exactly_the_code_it_runs(dvc_yaml):
    for name, stage in dvc_yaml["stages"].items():
        code = {d for d in _paths(stage["deps"]) if d.startswith(("components/", "model/"))}
        assert code == _project_imports(f"components.{name}"), name


def test_dvc_args_apply_a_partial_params_file(tmp_path):
    base = tmp_path / "params.yaml"
    base.write_text("train:\n  epochs: 100\n  pretrained: false\n  dims: null\n"
                    "split:\n  mode: grouped\n")
    override = tmp_path / "o.yaml"
    override.write_text("train:\n  epochs: 3\n  dims: [8, 16]\n  depths: [1, 1]\n"
                        "  pretrained: true\nsplit:\n  mode: paper\n")
    flags = dvc_set_params(str(override), str(base))
    assert flags == ["-S", "train.epochs=3", "-S", "train.dims=[8,16]", "-S", "+train.depths=[1,1]",
                     "-S", "train.pretrained=true", "-S", "split.mode=paper"]
    # the project's demo override applies to the project's params.yaml
    demo = dvc_set_params(str(ROOT / "params.demo.yaml"), str(ROOT / "params.yaml"))
    assert demo[0::2] == ["-S"] * (len(demo) // 2)


def _dvc(repo: Path, *args: str, env: dict, timeout: int = 900) -> str:
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, text=True,
                          capture_output=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{output[-4000:]}"
    return output


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, text=True,
                          capture_output=True).stdout


TINY = """\
preprocess: {size: 40}
train: {img_size: 32, dims: [8, 16, 24, 32], depths: [1, 1, 1, 1], epochs: 1, batch_size: 16,
        warmup_epochs: 0, num_workers: 0, ema_decay: 0.9}
evaluate: {bootstrap: 20}
"""


@pytest.mark.slow
def test_dvc_repro_end_to_end_with_an_override_then_nothing_then_only_train_onwards(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    from components import synth

    repo = tmp_path / "project"
    repo.mkdir()
    for name in ("components", "model"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", "pyproject.toml"):
        shutil.copy(ROOT / name, repo / name)
    (repo / ".gitignore").write_text("__pycache__/\nmlflow.db\nmlruns/\nmlartifacts/\n.train.lock\n")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "OMP_NUM_THREADS": "2", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    _git(repo, "init", "-q")
    _dvc(repo, "init", "-q", env=env)
    synth.run(repo / "data" / "raw", n=160, seed=0)
    _dvc(repo, "add", "-q", "data/raw", env=env)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "project + data/raw.dvc")
    defaults = (repo / "params.yaml").read_text()

    # 1. the override file as an experiment: every stage runs, on CPU
    override = tmp_path / "tiny.yaml"
    override.write_text(TINY)
    out = _dvc(repo, "exp", "run", "-n", "tiny", *dvc_set_params(str(override), str(repo / "params.yaml")),
               env=env)
    assert _ran(out) == STAGES
    registered = json.loads((repo / "outputs" / "register.json").read_text())
    assert registered["version"] == "1" and registered["alias"] == "challenger"
    assert _git(repo, "show", "HEAD:params.yaml") == defaults, "committed defaults untouched"

    # 2. nothing changed: nothing runs
    out = _dvc(repo, "repro", env=env)
    assert _ran(out) == [] and "up to date" in out

    # 3. a train param: train and what follows only
    out = _dvc(repo, "exp", "run", "-n", "longer", "-S", "train.epochs=2",
               "-S", "train.peak_lr=0.005", env=env)
    assert _ran(out) == ["train", "evaluate", "register"]
    assert json.loads((repo / "outputs/train/training_summary.json").read_text())["epochs"] == 2

    # 4. `dvc exp show` lists both experiments' params and metrics
    shown = json.loads(subprocess.run([str(BIN / "dvc"), "exp", "show", "--json"], cwd=repo,
                                      env=env, text=True, capture_output=True, check=True).stdout)
    experiments = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                experiments[rev["name"]] = rev["data"]
    assert {"tiny", "longer"} <= set(experiments)
    for name, epochs in (("tiny", 1), ("longer", 2)):
        data = experiments[name]
        metrics = data["metrics"]["outputs/eval/metrics.json"]["data"]
        assert 0.0 <= metrics["balanced_accuracy"] <= 1.0
        assert data["params"]["params.yaml"]["data"]["train"]["epochs"] == epochs
    assert experiments["longer"]["params"]["params.yaml"]["data"]["train"]["peak_lr"] == 0.005
