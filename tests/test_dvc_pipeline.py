"""dvc.yaml: six stages wired by their files, each reading its own params section, every
module it runs declared as a dependency; and (slow) on a copy of the project with tiny
synthetic data holding two unreadable images (skip_corrupt on):
- `skinlesion demo` runs the chain with the default MLflow store, leaves the project's tracked
  files untouched, and its registered model loads from the project (`skinlesion predict`);
- two `skinlesion exp run`s with different -S values: the first one's epoch line arrives while
  it runs, its summary has intervals, its MLflow run names the DVC experiment; neither the
  second experiment nor a compiled pipeline inherits the first one's values; `skinlesion exp show` lists both with
  their headline metrics and registered versions; the unreadable images are in no split;
- a train stage killed mid-run resumes from its checkpoint when `dvc repro` runs again; with
  another recipe it sets the old run aside, and fails when params.yaml is edited meanwhile."""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from components.commands import experiments
from components.commands.experiments import dvc_set_params

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
        assert stage["cmd"].startswith(f"python -m components.{name} --params params.yaml "), name
    produced = {name: _produced(stage) for name, stage in stages.items()}
    assert all(p.startswith("data/prepared/") for p in produced["preprocess"])
    assert all(p.startswith("data/splits/") for p in produced["split"])
    assert produced["class_weights"] == ["data/class_weights.json"]
    assert all(p.startswith("outputs/train/") for p in produced["train"])
    assert all(p.startswith("outputs/eval/") for p in produced["evaluate"])
    assert produced["register"] == ["outputs/register.json"]
    # one DVC metric, so that `dvc exp show` stays readable: the headline test metrics
    metrics = [p for stage in stages.values() for p in _paths(stage.get("metrics"))]
    assert metrics == ["outputs/eval/headline.json"]
    curves = {"outputs/eval/roc.csv", "outputs/eval/reliability.csv"}
    assert curves <= set(produced["evaluate"])
    drawn = {path for plot in dvc_yaml["plots"] for spec in plot.values() for path in spec["y"]}
    assert curves <= drawn, "the top-level plots draw the ROC and reliability curves"
    persisted = [next(iter(o)) for o in stages["train"]["outs"]
                 if isinstance(o, dict) and next(iter(o.values())).get("persist")]
    assert "outputs/train/checkpoint_last.pt" in persisted and "--resume auto" in \
        stages["train"]["cmd"], "an interrupted train stage resumes"


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
        "preprocess": set(), "split": {"preprocess"}, "class_weights": {"split"},
        "train": {"preprocess", "split", "class_weights"},
        "evaluate": {"train", "preprocess", "split"},
        "register": {"train", "evaluate", "split"},
    }
    # every path a command reads is a dependency, every path it writes an output
    for name, stage in stages.items():
        mentioned = set(re.findall(r"(?:data|outputs)/[\w./-]+", stage["cmd"]))
        declared = set(_paths(stage["deps"])) | set(_produced(stage))
        for path in mentioned:
            assert any(path == d or path.startswith(d.rstrip("/") + "/") or
                       d.startswith(path.rstrip("/") + "/") for d in declared), (
                f"{name}: {path} in the command is neither a dep nor an out")


def test_each_stage_reads_its_own_params_section(dvc_yaml, params):
    for name, stage in dvc_yaml["stages"].items():
        assert stage["params"] == [name], f"{name} declares exactly its section"
        assert name in params and not re.findall(r"\$\{", stage["cmd"])


def _project_imports(module: str) -> set[str]:
    """Files of the project modules `module` imports when loaded, transitively (module-level
    imports: what runs inside a function, e.g. mlflow in evaluate's registry path, is lazy)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        path = ROOT / (name.replace(".", "/") + ".py")
        if not path.is_file():
            path = ROOT / name.replace(".", "/") / "__init__.py"
        if not path.is_file() or path in seen:
            continue
        seen.add(path)
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                todo += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return {str(p.relative_to(ROOT)) for p in seen} - {"components/__init__.py"}


def test_each_stage_depends_on_the_code_it_runs(dvc_yaml):
    for name, stage in dvc_yaml["stages"].items():
        declared = [d for d in _paths(stage["deps"]) if d.startswith(("components/", "model"))]
        used = _project_imports(f"components.{name}")
        for path in used:
            assert any(path == d or path.startswith(d.rstrip("/") + "/") for d in declared), (
                f"{name} runs {path}, which no declared dependency covers")
        for dep in declared:
            assert any(p == dep or p.startswith(dep + "/") for p in used), (
                f"{name} declares {dep} but imports nothing from it")


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
    assert {"train.img_size=64", "train.dims=[32,64,96,128]", "preprocess.size=72",
            "evaluate.bootstrap=200"} <= set(demo[1::2])


def _run(repo: Path, *args: str, env: dict, timeout: int = 900) -> str:
    done = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=repo, env=env, text=True,
                          capture_output=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{output[-4000:]}"
    return output


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, text=True,
                          capture_output=True).stdout


def test_exp_run_relays_its_output_as_it_comes(monkeypatch, tmp_path, capsys):
    """Stages numbered, DVC's per-output warnings folded into one line, a note when a stage
    is quiet (here 0.2 s; a minute in use), then the stage's next line."""
    monkeypatch.setattr(experiments, "QUIET_NOTE_S", 0.2)
    warn = "WARNING: No file hash info found for '{}'. It won't be created."
    script = (f"import time; print({warn.format('a')!r}); print({warn.format('b')!r}); "
              "print(\"Running stage 'train':\", flush=True); time.sleep(1); print('epoch 1/1')")
    code, lines = experiments.stream([sys.executable, "-c", script], tmp_path,
                                     dict(os.environ), 6)
    out = capsys.readouterr().out
    assert code == 0 and lines[-1] == "epoch 1/1" and "No file hash" not in out
    assert "(DVC had no version of 2 outputs to restore" in out
    assert "[1/6] Running stage 'train':" in out
    assert out.index("stage train still running") < out.index("epoch 1/1")


TINY = """\
preprocess: {size: 40, skip_corrupt: true}
train: {img_size: 32, dims: [8, 16, 24, 32], depths: [1, 1, 1, 1], epochs: 1, batch_size: 16,
        warmup_epochs: 0, num_workers: 0, ema_decay: 0.9}
evaluate: {bootstrap: 20}
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict]:
    """A git + DVC copy of the project with synthetic data/raw (two unreadable images)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    from components.commands import synth
    from test_pipeline_local import add_unreadable_images

    tmp = tmp_path_factory.mktemp("dvc")
    repo = tmp / "project"
    repo.mkdir()
    for name in ("components", "model", "pipeline"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", "params.demo.yaml", "pyproject.toml", ".gitignore",
                 ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    (repo / "tiny.yaml").write_text(TINY)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
           "OMP_NUM_THREADS": "2", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    _git(repo, "init", "-q")
    _run(repo, "dvc", "init", "-q", env=env)
    synth.run(repo / "data" / "raw", n=160, seed=0)
    add_unreadable_images(repo / "data" / "raw")
    _run(repo, "dvc", "add", "-q", "data/raw", env=env)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "project + data/raw.dvc")
    return repo, env


@pytest.mark.slow
def test_demo_leaves_the_project_untouched_and_its_model_loads(project, tmp_path):
    repo, env = project
    local = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}  # the default store
    out = _run(repo, "skinlesion", "demo", "--override", "tiny.yaml", "--name", "d1", env=local)
    assert "Registered: skin-lesion-hybrid version" in out and "alias challenger" in out
    assert _git(repo, "status", "--porcelain") == "", "the demo changed tracked files"
    # the experiment ran in the scratch copy (its outputs live in the experiment's commit)
    assert not (repo / "outputs").exists() and (repo / ".demo/d1/dvc.yaml").is_file()
    # ... which DVC deleted: the registered model's files must outlive it
    images = sorted((repo / "data/raw/images").glob("*.jpg"))[2:5]  # [0:2]: unreadable
    _run(repo, "skinlesion", "predict", "--model", "models:/skin-lesion-hybrid@challenger",
         *map(str, images), "--out", str(tmp_path / "p.csv"), env=local)
    predicted = (tmp_path / "p.csv").read_text().splitlines()
    assert len(predicted) == 4 and all(line.split(",")[-1] == "" for line in predicted[1:])


def _stream_exp_run(repo: Path, env: dict, *args: str) -> tuple[str, str | None]:
    """`skinlesion exp run ARGS`, read line by line as it runs; returns its output and the
    experiment refs git held when the first epoch line arrived (None: no epoch line)."""
    proc = subprocess.Popen([str(BIN / "skinlesion"), "exp", "run", *args], cwd=repo, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines, recorded = [], None
    for line in proc.stdout:
        lines.append(line)
        if recorded is None and re.match(r"epoch 1/\d+ +loss .* img/s", line):
            recorded = _git(repo, "for-each-ref", "refs/exps")
    out = "".join(lines)
    assert proc.wait(timeout=60) == 0, f"exp run failed:\n{out[-4000:]}"
    return out, recorded


@pytest.mark.slow
def test_experiments_do_not_leak_into_each_other_or_into_the_pipeline(project, tmp_path):
    repo, env = project
    committed = (repo / "params.yaml").read_text()
    out, recorded = _stream_exp_run(repo, env, "-n", "first", "--params_file", "tiny.yaml",
                                    "-S", "train.seed=1")
    assert _ran(out) == STAGES
    assert recorded is not None and "/first" not in recorded, \
        "the epoch line came only after the experiment was recorded:\n" + out[-3000:]
    assert not re.search("No file hash info|test None|Downloading artifacts", out), out[-3000:]
    assert re.search(r"balanced accuracy +0\.\d{3} +\[0\.\d{3}, [01]\.\d{3}\]", out), out[-3000:]
    assert "Registered: skin-lesion-hybrid version" in out
    # the MLflow run names the DVC experiment and the commit it started from
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    [run] = client.search_runs([client.get_experiment_by_name("skin-lesion").experiment_id],
                               "tags.dvc_experiment = 'first'")
    assert run.data.tags["dvc_baseline_rev"] == _git(repo, "rev-parse", "HEAD").strip()
    out = _run(repo, "skinlesion", "exp", "run", "-n", "second", "--params_file", "tiny.yaml",
               "-S", "train.peak_lr=0.005", env=env)
    assert set(_ran(out)) >= {"train", "evaluate", "register"}
    assert (repo / "params.yaml").read_text() == committed
    assert _git(repo, "status", "--porcelain") == ""

    rows = {r["experiment"]: r for r in json.loads(_run(
        repo, "skinlesion", "exp", "show", "--format", "json", env=env))}
    assert {"first", "second"} <= set(rows)
    assert rows["first"]["train.seed"] == 1 and rows["second"]["train.seed"] == 0
    assert rows["first"]["train.peak_lr"] == 0.01 and rows["second"]["train.peak_lr"] == 0.005
    assert "train.momentum" not in rows["first"], "only the params that differ are shown"
    shown = _run(repo, "skinlesion", "exp", "show", env={**env, "COLUMNS": "120"})
    assert max(map(len, shown.splitlines())) <= 120 and "first" in shown, shown
    for name in ("first", "second"):
        assert re.fullmatch(r"0\.\d{3} \[0\.\d\d, [01]\.\d\d\]", rows[name]["balanced_accuracy"])
        assert rows[name]["registered"].startswith("skin-lesion-hybrid v")

    _run(repo, "skinlesion", "pipeline", "compile", "-o", str(tmp_path / "p.yaml"), env=env)
    spec = next(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))
    train = spec["root"]["inputDefinitions"]["parameters"]["train_params"]["defaultValue"]
    assert train["epochs"] == 100 and train["seed"] == 0 and train["peak_lr"] == 0.01

    # skip_corrupt carried through: the two unreadable images are reported and in no split
    _run(repo, "dvc", "exp", "apply", "first", env=env)
    report = json.loads((repo / "data/prepared/preprocess_report.json").read_text())
    bad = sorted(c["image"] for c in report["corrupt"])
    assert len(bad) == 2
    splits = "".join((repo / f"data/splits/{n}.csv").read_text() for n in ("train", "val", "test"))
    assert not any(image in splits for image in bad)
    assert json.loads((repo / "outputs/register.json").read_text())["alias"] == "challenger"
    _git(repo, "checkout", "params.yaml")


@pytest.mark.slow
def test_an_interrupted_train_stage_resumes_from_its_checkpoint(project):
    from components.common import atomic

    repo, env = project
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in yaml.safe_load(TINY).items():
        params[section].update(values)
    params["train"]["epochs"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _git(repo, "commit", "-qam", "tiny recipe, 3 epochs")
    held = repo / "outputs/train/checkpoint_last.pt.held"

    log = repo.parent / "repro.log"

    def repro_held_in_epoch_2() -> subprocess.Popen:
        """`dvc repro` (output in `log`), its training stopped inside its epoch-2 checkpoint
        write."""
        with open(log, "w") as sink:
            proc = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=repo,
                                    start_new_session=True, stdout=sink, stderr=subprocess.STDOUT,
                                    env={**env, atomic.HOLD_ENV: "checkpoint_last.pt"})
        deadline = time.monotonic() + 600
        while not held.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert held.exists(), "training never reached its second checkpoint"
        return proc

    proc = repro_held_in_epoch_2()
    os.killpg(proc.pid, signal.SIGKILL)  # mid-run: epoch 2's checkpoint never lands
    proc.wait()
    held.unlink()
    out = _run(repo, "dvc", "repro", env=env)
    assert "resuming" in out and "(epoch 1)" in out, out[-3000:]
    summary = json.loads((repo / "outputs/train/training_summary.json").read_text())
    assert summary["completed"] and summary["epochs"] == 3
    assert "up to date" in _run(repo, "dvc", "repro", env=env)

    # Another recipe: the finished run is moved aside, not deleted; params.yaml edited while
    # that training runs: the stage fails naming the key, and dvc.lock keeps the old values.
    def set_peak_lr(value: float) -> None:
        params["train"]["peak_lr"] = value
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    set_peak_lr(0.02)
    earlier = set((repo / "outputs/train").glob("superseded-*"))  # other tests' runs, moved
    proc = repro_held_in_epoch_2()
    set_peak_lr(0.03)
    held.unlink()
    assert proc.wait(timeout=600) != 0
    out = log.read_text()
    assert "train.peak_lr (0.02 -> 0.03)" in out, out[-3000:]
    [aside] = set((repo / "outputs/train").glob("superseded-*")) - earlier
    assert aside.name in out  # the message names where the run went
    # (DVC itself removes the stage's other outputs before it runs; ema_weights.pt is cached)
    assert {p.name for p in aside.iterdir()} == {"checkpoint_last.pt", "checkpoint_best.pt",
                                                 "checkpoint_prev.pt"}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["peak_lr"] == 0.01
    assert "up to date" not in _run(repo, "dvc", "status", env=env)
