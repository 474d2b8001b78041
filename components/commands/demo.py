"""`skinlesion demo` (README's first command): the whole pipeline on this machine, on CPU,
leaving the project exactly as it was.

1. a scratch copy of the project in `.demo/<name>/` (its tracked files as they are in the
   workspace, a git repository of its own; `.demo/` is ignored by git and DVC);
2. `data/raw` there: the project's own data/raw when it has one (hard links, no copy), else a
   synthetic ISIC-format dataset (`skinlesion synth`); `dvc add data/raw` and a commit;
3. `skinlesion exp run --params_file params.demo.yaml` there: the six stages as a DVC
   experiment on params.yaml + the demo's small settings, MLflow in the project's ./mlflow.db
   (unless MLFLOW_TRACKING_URI is set);
4. the test metrics, the registered model version and alias, and where to look next.

The project's params.yaml, data/ and outputs/ are never written (tests/test_dvc_pipeline.py
checks `git status`); the copy stays for inspection (`cd .demo/<name> && dvc exp show`).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from components.common import cli_args
from components.common.config import PARAMS_FILE
from components.commands import experiments, venv

SCRATCH = ".demo"


def _sh(cwd: Path, env: dict, *command: str) -> None:
    subprocess.run(command, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)


def make_copy(root: Path, dest: Path, env: dict) -> None:
    """The project's tracked files, as they are in the workspace, as a fresh git + DVC repo."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True,
                             check=True).stdout.decode().split("\0")
    for rel in filter(None, tracked):
        src = root / rel
        if src.is_file() and not rel.startswith(".dvc/"):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    _sh(dest, env, "git", "init", "-q")
    _sh(dest, env, venv.tool("dvc"), "init", "-q")
    _sh(dest, env, "git", "add", "-A")
    _sh(dest, env, "git", "commit", "-qm", "the project, as in the workspace")


def full_data(root: Path, out: Path, n: int, seed: int) -> str:
    """The project's own data/raw hard-linked into `out` (no copy), else a synthetic dataset of
    `n` images there; returns where it came from."""
    from components.commands import synth

    own = root / "data" / "raw"
    if (own / "labels.csv").is_file():
        shutil.copytree(own, out, copy_function=os.link)
        return f"the project's {own}"
    synth.run(out, n=n, seed=seed)
    return f"a synthetic dataset of {n} images"


def add_data(root: Path, dest: Path, env: dict, n: int, seed: int) -> str:
    """data/raw in the copy, tracked by DVC and committed; returns where it came from."""
    source = full_data(root, dest / "data" / "raw", n, seed)
    _sh(dest, env, venv.tool("dvc"), "add", "--quiet", "data/raw")
    _sh(dest, env, "git", "add", "data/raw.dvc", "data/.gitignore")
    staged = subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=dest, env=env)
    if staged.returncode:  # else the project's own data/raw.dvc, copied, already says this
        _sh(dest, env, "git", "commit", "-qm", "data/raw")
    return source


def scratch(root: Path, name: str) -> Path:
    """The demo's new, empty folder `.demo/<name>` of the git + DVC checkout `root`."""
    if not (root / ".git").exists() or not (root / ".dvc").is_dir():
        raise SystemExit(f"{root} is not a git + DVC checkout of this project; clone it first")
    dest = root / SCRATCH / name
    if dest.exists():
        raise SystemExit(f"{dest} exists: choose another --name")
    dest.mkdir(parents=True)
    print(f"scratch copy of the project: {dest}", flush=True)
    return dest


def run(root: str | os.PathLike = ".", n: int = 400, seed: int = 0,
        override: str = "params.demo.yaml", name: str | None = None) -> dict:
    """Run the demo from the project at `root`; returns metrics, registration and where."""
    root = Path(root).resolve()
    name = name or time.strftime("demo-%Y%m%d-%H%M%S")
    dest = scratch(root, name)
    env = experiments.environment(root)  # MLflow: the project's mlflow.db, not the copy's
    make_copy(root, dest, env)
    print(f"data/raw: {add_data(root, dest, env, n, seed)}", flush=True)
    # the stage commands and the experiment run inside the copy, with this interpreter; it
    # prints the test metrics and the registration at its end
    subprocess.run([sys.executable, "-m", "components.commands.cli", "exp", "run", "--name", name,
                    "--params_file", override], cwd=dest, env=env, check=True)
    return {"experiment": name, "copy": str(dest), **experiments.results(dest, name),
            "tracking_uri": env["MLFLOW_TRACKING_URI"]}


def _next_steps(result: dict) -> str:
    reg = result["registration"]
    model = f"models:/{reg.get('name') or 'skin-lesion-hybrid'}@challenger"
    return "\n".join([
        f"\nExperiment {result['experiment']} ran in {result['copy']}; this project's "
        f"{PARAMS_FILE}, data/ and outputs/ are untouched (`cd {result['copy']} && "
        f"skinlesion exp show` lists it).",
        "",
        "Next (after `source .venv/bin/activate`, which puts skinlesion, dvc and mlflow on PATH):",
        "  skinlesion tracking-server                                    # the MLflow UI on this store",
        "  skinlesion promote --metric balanced_accuracy                 # challenger -> champion",
        f"  skinlesion predict --model {model} "
        f"--dir {result['copy']}/data/raw/images --out predictions.csv",
        f"  skinlesion serve --model {model}   # HTTP scoring server",
        "  skinlesion pipeline compile -o pipeline.yaml                  # the same steps on Kubeflow",
        "  skinlesion pipeline submit --host http://<kfp-host> --params_file params.demo.yaml",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = cli_args.ArgumentParser(prog="skinlesion demo", description=__doc__)
    parser.add_argument("--n", type=int, default=400, help="synthetic images (when the project "
                                                           "has no data/raw)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--override", default="params.demo.yaml", help="partial params file to apply")
    parser.add_argument("--name", default=None, help="experiment name (default demo-<time>)")
    parser.add_argument("--versions", type=int, choices=(1, 2), default=1,
                        help="2: a first data version (60%% of the lesions), then all of them: "
                             "train, register and promote each, the paired comparison and the "
                             "data diff (components/commands/demo_versions.py)")
    args = parser.parse_args(argv)
    if args.versions == 2:
        from components.commands import demo_versions
        return demo_versions.main(".", args.n, args.seed, args.override, args.name)
    print(_next_steps(run(".", n=args.n, seed=args.seed, override=args.override, name=args.name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
