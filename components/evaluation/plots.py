"""Evaluation figures as PNG files: confusion matrix (counts and row-normalised), one-vs-rest
ROC curves, reliability diagram. Figures are built without pyplot's global state and saved
atomically."""
from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay  # noqa: E402

from components.common.atomic import atomic_path  # noqa: E402


def plot_confusion(cm, classes: Sequence[str], path: str | os.PathLike,
                   normalize: bool = False) -> None:
    """Confusion matrix heat map, rows true and columns predicted; `normalize` divides each
    row by its total (recall on the diagonal; a class without test images stays at 0)."""
    cm = np.asarray(cm, dtype=np.float64)
    if normalize:
        rows = cm.sum(axis=1, keepdims=True)
        cm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.add_subplot()
    ConfusionMatrixDisplay(cm, display_labels=list(classes)).plot(
        ax=ax, cmap="Blues", colorbar=True, values_format=".2f" if normalize else ".0f")
    ax.set_title("Confusion matrix (row-normalised)" if normalize else "Confusion matrix")
    _save(fig, path)


def plot_roc(y_true, probs, classes: Sequence[str], path: str | os.PathLike) -> None:
    """One-vs-rest ROC curve of every class that has both positives and negatives."""
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.add_subplot()
    for c, name in enumerate(classes):
        positives = y_true == c
        if 0 < positives.sum() < len(y_true):
            RocCurveDisplay.from_predictions(positives, probs[:, c], name=name, ax=ax,
                                             plot_chance_level=c == 0)
    ax.set(title="ROC curves (one vs rest)", xlabel="false positive rate",
           ylabel="true positive rate")
    ax.legend(loc="lower right", fontsize="small")
    _save(fig, path)


def plot_reliability(bins: dict, ece: float, path: str | os.PathLike,
                     calibrated: tuple[dict, float] | None = None) -> None:
    """Reliability diagram: accuracy per confidence bin against the diagonal, with counts;
    `calibrated` (its bins and ECE after temperature scaling) is drawn beside as a line."""
    lower, upper = np.asarray(bins["lower"]), np.asarray(bins["upper"])
    acc = np.nan_to_num(np.asarray(bins["accuracy"], dtype=np.float64))
    fig = Figure(figsize=(6, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.bar(lower, acc, width=upper - lower, align="edge", edgecolor="black", label="accuracy")
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    title = f"Reliability diagram (ECE {ece:.3f})"
    if calibrated is not None:
        after, after_ece = calibrated
        filled = np.asarray(after["count"]) > 0
        top.plot(np.asarray(after["confidence"])[filled], np.asarray(after["accuracy"])[filled],
                 "o-", color="tab:orange", label="temperature-scaled")
        bottom.step(lower, after["count"], where="post", color="tab:orange")
        title = f"Reliability diagram (ECE {ece:.3f}; temperature-scaled {after_ece:.3f})"
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=title)
    top.legend(loc="upper left")
    bottom.bar(lower, bins["count"], width=upper - lower, align="edge", edgecolor="black")
    bottom.set(xlabel="confidence (top-class probability)", ylabel="images")
    _save(fig, path)


def _save(fig: Figure, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
