"""The MLflow UI in a headless browser: docs/ui_pictures.py starts a real `mlflow server`,
makes two real training runs and a registered model with both aliases through the pipeline's
steps, and opens the runs, run and model pages in Debian's Chromium; the pages must show the
headline metric names and the aliases, and their screenshots must be real pictures."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from procs import run_group

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "docs" / "ui_pictures.py"
CHROMIUM = "/usr/bin/chromium"
PICTURES = ("mlflow_runs.png", "mlflow_run.png", "mlflow_model.png")


@pytest.mark.slow
@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                    reason=f"{CHROMIUM} not installed (Debian's chromium package)")
def test_mlflow_ui_shows_metrics_and_aliases(tmp_path):
    out = tmp_path / "pictures"
    result = run_group([sys.executable, str(TOOL), "--out", str(out)], timeout=600, cwd=ROOT)
    log = f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    assert result.returncode == 0, log
    assert "ui_pictures: all checks passed" in result.stdout, log
    for page in ("mlflow_runs", "mlflow_run", "mlflow_model"):
        assert f"ok  {page}: shows" in result.stdout, log
    assert "alias challenger, alias champion" in result.stdout, log
    assert "metric balanced_accuracy" in result.stdout, log
    for name in PICTURES:
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), name
        assert len(data) > 20_000, f"{name}: {len(data)} bytes, a blank page?"
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width == 1400 and height >= 600, (name, width, height)
    assert not list(out.glob("*.html")), "a page's DOM is kept only when its check failed"
