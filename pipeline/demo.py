"""`skinlesion demo` (README's first command): the whole pipeline on this machine, on CPU.

1. `data/raw`: a synthetic ISIC-format dataset (`skinlesion synth`) unless one is there;
2. `dvc add data/raw`, so the data is versioned like a real one;
3. `dvc exp run` with params.demo.yaml's small settings applied as `-S` overrides, so
   params.yaml keeps the paper's recipe (preprocess -> split -> class_weights -> train ->
   evaluate -> register, MLflow in ./mlflow.db unless MLFLOW_TRACKING_URI is set);
4. the test metrics, the registered model version and alias, and where to look next.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.cli import dvc_set_params

HEADLINE = (("accuracy", "accuracy", 0.9348), ("balanced_accuracy", "balanced accuracy", None),
            ("precision_macro", "precision (macro)", 0.9324), ("recall_macro", "recall (macro)", 0.9070),
            ("f1_macro", "F1 (macro)", 0.9182), ("roc_auc_macro", "ROC-AUC (macro)", None),
            ("ece", "calibration error", None))


def _environment(root: Path) -> dict[str, str]:
    """dvc's stage commands say `python -m ...`: make that this interpreter, whatever PATH says."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    # `dvc exp run` records each experiment as a git commit, which needs an identity.
    has_identity = subprocess.run(["git", "config", "user.email"], cwd=root,
                                  capture_output=True, text=True).stdout.strip()
    if not has_identity:
        env.setdefault("GIT_AUTHOR_NAME", "skinlesion demo")
        env.setdefault("GIT_AUTHOR_EMAIL", "demo@localhost")
        env.setdefault("GIT_COMMITTER_NAME", "skinlesion demo")
        env.setdefault("GIT_COMMITTER_EMAIL", "demo@localhost")
    return env


def _dvc(root: Path, env: dict, *args: str) -> None:
    command = [str(Path(sys.executable).parent / "dvc"), *args]
    print("$ dvc " + " ".join(args), flush=True)
    subprocess.run(command, cwd=root, env=env, check=True)


def run(root: str | os.PathLike = ".", n: int = 400, seed: int = 0,
        override: str = "params.demo.yaml", name: str | None = None) -> dict:
    """Run the demo in the project at `root`; returns the test metrics and the registration."""
    from components import synth

    root = Path(root).resolve()
    if not (root / ".git").exists() or not (root / ".dvc").is_dir():
        raise SystemExit(f"{root} is not a git + DVC checkout of this project; clone it first")
    env = _environment(root)
    raw = root / "data" / "raw"
    if not (raw / "labels.csv").is_file():
        print(f"writing a synthetic dataset of {n} images to {raw}", flush=True)
        synth.run(raw, n=n, seed=seed)
    _dvc(root, env, "add", "--quiet", "data/raw")
    flags = dvc_set_params(str(root / override), str(root / "params.yaml"))
    name = name or time.strftime("demo-%Y%m%d-%H%M%S")
    _dvc(root, env, "exp", "run", "--name", name, *flags)

    metrics = json.loads((root / "outputs" / "eval" / "metrics.json").read_text())
    registration = json.loads((root / "outputs" / "register.json").read_text())
    return {"experiment": name, "metrics": metrics, "registration": registration,
            "tracking_uri": env["MLFLOW_TRACKING_URI"]}


def _report(result: dict) -> str:
    metrics, ci = result["metrics"], result["metrics"].get("ci95", {})
    lines = [f"\nTest metrics of the EMA model ({metrics.get('n_images')} images, "
             "95% bootstrap intervals; the paper's ISIC 2019 figures for scale):",
             f"  {'metric':<20}{'value':>8}   {'95% interval':<17}{'paper':>7}"]
    for key, label, paper in HEADLINE:
        value = metrics.get(key)
        if value is None:
            continue
        low_high = ci.get(key)
        interval = f"[{low_high['low']:.3f}, {low_high['high']:.3f}]" if low_high else ""
        lines.append(f"  {label:<20}{value:>8.3f}   {interval:<17}"
                     f"{'' if paper is None else f'{paper:.3f}':>7}")
    reg = result["registration"]
    if reg.get("version"):
        lines.append(f"\nRegistered: {reg['name']} version {reg['version']}, "
                     f"alias {reg.get('alias')} (run {reg.get('run_id')})")
    else:
        lines.append(f"\nNot registered: {reg.get('reason', reg)}")
    lines += [
        f"Experiment {result['experiment']}: `dvc exp show` compares it with other runs; "
        "params.yaml still holds the paper's recipe (`git diff params.yaml` shows the demo's "
        "overrides in the workspace, `git checkout params.yaml` drops them).",
        "",
        "Next (after `source .venv/bin/activate`, which puts skinlesion, dvc and mlflow on PATH):",
        f"  mlflow ui --backend-store-uri {result['tracking_uri']}      # runs, metrics, the registry",
        "  skinlesion promote --metric balanced_accuracy                 # challenger -> champion",
        "  skinlesion predict --model models:/skin-lesion-hybrid@challenger --dir data/raw/images --out predictions.csv",
        "  skinlesion pipeline compile -o pipeline.yaml                  # the same steps on Kubeflow",
        "  skinlesion pipeline submit --host http://<kfp-host> --params-file params.demo.yaml",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="skinlesion demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=400, help="synthetic images (when data/raw is absent)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--override", default="params.demo.yaml", help="partial params file to apply")
    parser.add_argument("--name", default=None, help="experiment name (default demo-<time>)")
    args = parser.parse_args(argv)
    print(_report(run(".", n=args.n, seed=args.seed, override=args.override, name=args.name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
