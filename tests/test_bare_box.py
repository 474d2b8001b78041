"""Training and the benchmarks on a machine without the tracking stack: a bare GPU box or a
slim training image has torch, timm, pandas, scikit-learn and Pillow, but no mlflow, dvc,
kfp, the Kubeflow SDK or matplotlib. A subprocess whose imports of those fail runs
`skinlesion train --no_mlflow` and the HAM10000 study's smoke run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_data import TINY, make_splits

ROOT = Path(__file__).resolve().parents[1]
ABSENT = ("mlflow", "dvc", "kfp", "kubeflow", "kubernetes", "matplotlib")
# Installed before anything else runs (sitecustomize): importing ABSENT fails, as when the
# packages are not installed.
BLOCKER = f"""
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: a bare box)")
sys.meta_path.insert(0, Absent())
"""


def _bare(tmp_path: Path) -> dict:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    return {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "2"}


def test_the_blocker_blocks(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import mlflow"], env=_bare(tmp_path),
                          capture_output=True, text=True)
    assert done.returncode == 1 and "blocked: a bare box" in done.stderr


def test_train_without_the_tracking_stack(tmp_path):
    data = make_splits(tmp_path / "data")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "components.train", "--train_csv", str(data["train"]),
           "--val_csv", str(data["val"]), "--test_csv", str(data["test"]), "--img_dir",
           str(data["img_dir"]), "--out_dir", str(out), *TINY, "--batch_size", "8",
           "--epochs", "1", "--num_workers", "0", "--no_mlflow"]
    done = subprocess.run(cmd, env=_bare(tmp_path), capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "training_summary.json").read_text())["completed"]


@pytest.mark.slow
def test_the_ham10000_study_without_the_tracking_stack(shared_data, tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "ham10000.py"), "--smoke", "--out",
           str(tmp_path / "study"), "--data", str(shared_data / "ham10000-200x150"),
           "--variants", "sampler_only", "--no_mlflow"]
    done = subprocess.run(cmd, env=_bare(tmp_path), capture_output=True, text=True, timeout=900,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "study/runs/sampler_only-e1-s0/result.json").read_text())
    assert 0 <= result["test"]["balanced_accuracy"] <= 1
    assert "no figures" in done.stderr  # matplotlib absent: metrics, not pictures
