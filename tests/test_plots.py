"""Evaluation figures are written as non-empty PNG files, also with a class absent."""
from __future__ import annotations

import numpy as np

from components.common.labels import CLASSES
from components.evaluation.metrics import classification_metrics, expected_calibration_error, reliability_bins
from components.evaluation.plots import plot_confusion, plot_reliability, plot_roc

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plots_are_written(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(7), 6)                      # SCC absent: no curve, an empty row
    probs = rng.dirichlet(np.ones(8), len(y))
    cm = classification_metrics(y, probs, CLASSES)["confusion_matrix"]
    plot_confusion(cm, CLASSES, tmp_path / "cm.png")
    plot_confusion(cm, CLASSES, tmp_path / "cm_norm.png", normalize=True)
    plot_roc(y, probs, CLASSES, tmp_path / "roc.png")
    plot_reliability(reliability_bins(y, probs), expected_calibration_error(y, probs),
                     tmp_path / "reliability.png")
    for name in ("cm.png", "cm_norm.png", "roc.png", "reliability.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    assert sorted(p.name for p in tmp_path.iterdir()) == [   # no temporary files left over
        "cm.png", "cm_norm.png", "reliability.png", "roc.png"]
