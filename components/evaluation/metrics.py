"""Classification metrics for the evaluate step: headline scores, per-class table, calibration,
bootstrap intervals (the shapes KFP's metrics artifacts take: pipeline/publish.py).

scikit-learn computes every score it has. Written here by hand only what it lacks: expected
calibration error and reliability bins for a multi-class model (sklearn's `calibration_curve`
is binary only), and a bootstrap that resamples lesions rather than images.

Averages ("macro") run over the classes present in the test set, as balanced accuracy does in
scikit-learn and in the ISIC challenge; a class with no test images stays in the per-class
table with its recall and AUC left undefined (NaN) and is listed under `absent_classes`.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pandas as pd
import sklearn
from sklearn.metrics import (
    balanced_accuracy_score,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
    top_k_accuracy_score,
)

from components.common.config import GATE_METRICS

# Metrics that carry a bootstrap interval in metrics.json.
HEADLINE = (
    "accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro",
    "precision_weighted", "recall_weighted", "f1_weighted", "roc_auc_macro", "top2_accuracy",
    "ece",
)
# The few shown where there is room for few: the MLflow note and run columns, per-source and
# per-site tables.
HEADLINE_SHOWN = ("balanced_accuracy", "accuracy", "f1_macro", "roc_auc_macro")
PROB_SUM_ATOL = 1e-3
ECE_BINS = 15


def metrics_from_confusion(cm) -> dict:
    """Accuracy, balanced accuracy and macro / weighted precision, recall, F1 of a confusion
    matrix (rows true, columns predicted), plus the per-class arrays behind them."""
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or (cm < 0).any() or cm.sum() == 0:
        raise ValueError(f"confusion matrix must be square, non-negative and non-empty, got "
                         f"shape {cm.shape}")
    k = cm.shape[0]
    # One weighted sample per cell lets scikit-learn score the matrix without expanding it.
    y_true, y_pred = np.divmod(np.arange(k * k), k)
    weight = cm.ravel()
    support = cm.sum(axis=1)
    present = np.flatnonzero(support)
    p, r, f, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=np.arange(k), sample_weight=weight, zero_division=0.0)
    r = np.where(support > 0, r, np.nan)
    out = {"accuracy": float(np.trace(cm) / cm.sum())}
    for avg in ("macro", "weighted"):
        pa, ra, fa, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=present, sample_weight=weight, average=avg, zero_division=0.0)
        out.update({f"precision_{avg}": float(pa), f"recall_{avg}": float(ra),
                    f"f1_{avg}": float(fa)})
    with warnings.catch_warnings():  # it warns about predicted classes absent from y_true
        warnings.simplefilter("ignore", UserWarning)
        out["balanced_accuracy"] = float(balanced_accuracy_score(y_true, y_pred,
                                                                 sample_weight=weight))
    out["per_class"] = {"precision": p, "recall": r, "f1": f, "support": support}
    return out


def check_probabilities(probs, n_classes: int, source: str = "probabilities") -> np.ndarray:
    """Return `probs` as an (n, n_classes) float array; raise naming the first bad row."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != n_classes:
        raise ValueError(f"{source}: expected shape (n, {n_classes}), got {probs.shape}")
    bad = ~np.isfinite(probs).all(axis=1) | (probs < 0).any(axis=1) | \
        (np.abs(probs.sum(axis=1) - 1.0) > PROB_SUM_ATOL)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{source}: row {row} is not a probability vector (non-negative, "
                         f"summing to 1 within {PROB_SUM_ATOL}): {probs[row].tolist()}")
    return probs


def check_labels(y_true, n_classes: int, source: str = "labels") -> np.ndarray:
    y_true = np.asarray(y_true)
    if y_true.ndim != 1 or not np.issubdtype(y_true.dtype, np.integer):
        raise ValueError(f"{source}: expected a 1-d array of integer class indices")
    bad = (y_true < 0) | (y_true >= n_classes)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{source}: row {row} has class index {y_true[row]}, "
                         f"outside 0..{n_classes - 1}")
    return y_true


def reliability_bins(y_true, probs, n_bins: int = ECE_BINS) -> dict:
    """Top-label reliability: per equal-width confidence bin, the mean confidence, the
    accuracy and the image count (empty bins have NaN means)."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    # Bin i holds confidences in (i/n, (i+1)/n]; a confidence of exactly 0 joins bin 0.
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, conf, minlength=n_bins) / count
        acc = np.bincount(idx, correct, minlength=n_bins) / count
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {"lower": edges[:-1], "upper": edges[1:], "confidence": mean_conf,
            "accuracy": acc, "count": count}


def expected_calibration_error(y_true, probs, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE: the count-weighted mean gap between confidence and accuracy per bin."""
    b = reliability_bins(y_true, probs, n_bins)
    filled = b["count"] > 0
    gaps = np.abs(b["accuracy"][filled] - b["confidence"][filled])
    return float(np.sum(b["count"][filled] * gaps) / len(y_true))


def roc_auc_per_class(y_true, probs) -> np.ndarray:
    """One-vs-rest ROC-AUC per class; NaN where the test set has no positives or no negatives.
    (sklearn's multi-class `roc_auc_score` refuses a class absent from y_true, so the binary
    scores are taken one by one; their mean is its `ovr` macro.)"""
    out = np.full(probs.shape[1], np.nan)
    for c in range(probs.shape[1]):
        pos = y_true == c
        if 0 < pos.sum() < len(y_true):
            out[c] = roc_auc_score(pos, probs[:, c])
    return out


def _confusion(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    k = probs.shape[1]
    return np.bincount(y_true * k + probs.argmax(axis=1), minlength=k * k).reshape(k, k)


def _auc_macro(auc: np.ndarray) -> float:
    return float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan")


def _top2(y_true: np.ndarray, probs: np.ndarray) -> float:
    k = probs.shape[1]
    return float(top_k_accuracy_score(y_true, probs, k=min(2, k), labels=np.arange(k)))


def _scores(y_true: np.ndarray, probs: np.ndarray) -> dict:
    """Every scalar metric, plus the per-class arrays (no input checks: bootstrap's hot path)."""
    cm = _confusion(y_true, probs)
    out = metrics_from_confusion(cm)
    auc = roc_auc_per_class(y_true, probs)
    out["roc_auc_macro"] = _auc_macro(auc)
    out["top2_accuracy"] = _top2(y_true, probs)
    out["ece"] = expected_calibration_error(y_true, probs)
    out["per_class"]["auc"] = auc
    out["confusion_matrix"] = cm
    return out


def _score(y_true: np.ndarray, probs: np.ndarray, metric: str) -> float:
    """One metric of _scores, computing only what it needs (the paired bootstrap's hot path)."""
    if metric == "roc_auc_macro":
        return _auc_macro(roc_auc_per_class(y_true, probs))
    if metric == "top2_accuracy":
        return _top2(y_true, probs)
    if metric == "ece":
        return expected_calibration_error(y_true, probs)
    return metrics_from_confusion(_confusion(y_true, probs))[metric]


def classification_metrics(y_true, probs, classes: Sequence[str]) -> dict:
    """Headline metrics, per-class table and confusion matrix of predicted probabilities.

    Returns a JSON-able dict: n_images, the HEADLINE scalars, roc_auc_per_class,
    absent_classes, classes, confusion_matrix (rows true, columns predicted) and per_class
    ({class: {precision, recall, f1, auc, support}}). Undefined values are None.
    """
    classes = list(classes)
    probs = check_probabilities(probs, len(classes))
    y_true = check_labels(y_true, len(classes))
    if len(y_true) != len(probs):
        raise ValueError(f"{len(y_true)} labels but {len(probs)} probability rows")
    s = _scores(y_true, probs)
    pc = s["per_class"]
    out = {"n_images": int(len(y_true))}
    out.update({name: _num(s[name]) for name in HEADLINE})
    out["roc_auc_per_class"] = {c: _num(a) for c, a in zip(classes, pc["auc"])}
    out["absent_classes"] = [c for c, n in zip(classes, pc["support"]) if n == 0]
    out["classes"] = classes
    out["confusion_matrix"] = s["confusion_matrix"].tolist()
    out["per_class"] = {
        c: {key: _num(pc[key][i]) for key in ("precision", "recall", "f1", "auc", "support")}
        for i, c in enumerate(classes)
    }
    return out


def bootstrap_intervals(y_true, probs, groups=None, n: int = 1000, seed: int = 0,
                        level: float = 0.95) -> dict:
    """Percentile bootstrap interval of every HEADLINE metric: {metric: {"low", "high"}}
    (resampling lesions when `groups` is given: see `bootstrap`)."""
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true)

    def headline(rows: np.ndarray) -> dict:
        s = _scores(y_true[rows], probs[rows])
        return {name: s[name] for name in HEADLINE}

    intervals = bootstrap(headline, len(y_true), groups, n=n, seed=seed, level=level)
    return {name: intervals.get(name, {"low": None, "high": None}) for name in HEADLINE}


def bootstrap(statistic, n_rows: int, groups=None, n: int = 1000, seed: int = 0,
              level: float = 0.95) -> dict:
    """Percentile bootstrap interval of each scalar that `statistic(rows)` returns for a
    resample's row indices: {name: {"low", "high"}} ({} when n is 0).

    With `groups` (lesion ids; None/NaN entries count as their own group) whole groups are
    resampled, so images of one lesion stay together and the interval is not too narrow.
    scikit-learn has no grouped bootstrap (`sklearn.utils.resample` draws single rows).
    A NaN draw (e.g. AUC of a resample without a class) is left out of its interval.
    """
    members = _group_members(groups, n_rows)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    # Inputs were checked once; skipping scikit-learn's per-call validation halves the time.
    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        for _ in range(n):
            units = rng.integers(0, len(members), len(members))
            rows = np.concatenate([members[g] for g in units])
            for name, value in statistic(rows).items():
                draws.setdefault(name, []).append(value)
    tail = 100 * (1 - level) / 2
    out = {}
    for name, v in draws.items():
        v = np.asarray(v, dtype=np.float64)
        v = v[np.isfinite(v)]
        low, high = np.percentile(v, [tail, 100 - tail]) if len(v) else (np.nan, np.nan)
        out[name] = {"low": _num(low), "high": _num(high)}
    return out


def paired_difference(y_true, probs_challenger, probs_champion, groups, metric: str,
                      n: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Challenger minus champion in `metric` on the same images, with a lesion-level paired
    bootstrap interval: each resample scores both models on the same lesions, so what they
    share (the same hard lesions) cancels, and a real gain shows where two separate intervals
    overlap. {metric, n_images, n_lesions, challenger, champion, difference, low, high}."""
    if metric not in GATE_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(GATE_METRICS)}")
    y_true = np.asarray(y_true)
    new, old = (np.asarray(p, dtype=np.float64) for p in (probs_challenger, probs_champion))
    if not new.shape == old.shape == (len(y_true), new.shape[1]):
        raise ValueError(f"both models must be scored on the same images: {len(y_true)} labels, "
                         f"probabilities of shapes {new.shape} and {old.shape}")

    def scores(rows: np.ndarray) -> dict:
        return {"difference": _score(y_true[rows], new[rows], metric)
                - _score(y_true[rows], old[rows], metric)}

    challenger, champion = (_score(y_true, p, metric) for p in (new, old))
    interval = bootstrap(scores, len(y_true), groups, n=n, seed=seed, level=level)["difference"]
    return {"metric": metric, "n_images": len(y_true),
            "n_lesions": len(_group_members(groups, len(y_true))),
            "challenger": _num(challenger), "champion": _num(champion),
            "difference": _num(challenger - champion), **interval}


def paired_gate(diff: dict, min_delta: float) -> bool:
    """The promotion rule on a paired_difference: the whole interval is better than the
    champion by more than `min_delta` (its lower bound above it; for a lower-is-better metric
    such as ECE, its upper bound below -min_delta)."""
    if GATE_METRICS[diff["metric"]]:
        return diff["high"] is not None and diff["high"] < -min_delta
    return diff["low"] is not None and diff["low"] > min_delta


def _group_members(groups, n_rows: int) -> list[np.ndarray]:
    """Row indices of each resampling unit: one per group, or one per row without groups."""
    if groups is None:
        return [np.array([i]) for i in range(n_rows)]
    groups = np.asarray(groups, dtype=object)
    if len(groups) != n_rows:
        raise ValueError(f"{len(groups)} group ids for {n_rows} rows")
    units: dict = {}
    for i, g in enumerate(groups):
        missing = pd.isna(g) or (isinstance(g, str) and not g.strip())
        units.setdefault(("row", i) if missing else ("group", g), []).append(i)
    return [np.array(v) for v in units.values()]


def roc_points(y_true, probs, classes: Sequence[str], grid: int = 101) -> dict:
    """ROC curves of every class sampled on a common false-positive-rate grid (for one DVC
    plot with a line per class): {"fpr": grid, class: tpr or NaNs when undefined}."""
    fpr_grid = np.linspace(0.0, 1.0, grid)
    out = {"fpr": fpr_grid}
    for c, name in enumerate(classes):
        pos = y_true == c
        if 0 < pos.sum() < len(y_true):
            fpr, tpr, _ = roc_curve(pos, probs[:, c])
            out[name] = np.interp(fpr_grid, fpr, tpr)
        else:
            out[name] = np.full(grid, np.nan)
    return out


def operating_point(y_true, probs, positive: int, specificity: float = 0.9) -> dict | None:
    """One-vs-rest operating point of class `positive` at a fixed specificity: the highest
    threshold on its probability whose specificity is at least `specificity`, and the
    sensitivity there (melanoma-versus-rest is the decision that matters clinically).

    Returns {target_specificity, threshold, sensitivity, specificity, n_positive, n_negative,
    chosen_on: "test"}, or None when the test set has no positive or no negative image. The
    threshold is chosen on the images it scores: an optimistic figure, kept for comparison
    with the validation-chosen one (evaluation/decisions.py), which is what ships.
    """
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    pos = y_true == positive
    if not 0 < pos.sum() < len(y_true):
        return None
    fpr, tpr, thresholds = roc_curve(pos, probs[:, positive])
    ok = np.flatnonzero(1 - fpr >= specificity)  # roc_curve's fpr rises: the last ok is best
    i = int(ok[-1])
    return {"target_specificity": float(specificity),
            "threshold": float(min(thresholds[i], 1.0)),  # roc_curve's first threshold is inf
            "sensitivity": float(tpr[i]), "specificity": float(1 - fpr[i]),
            "n_positive": int(pos.sum()), "n_negative": int((~pos).sum()), "chosen_on": "test"}


def _num(x):
    """A JSON-friendly number: int for counts, float otherwise, None for NaN."""
    if isinstance(x, (int, np.integer)):
        return int(x)
    x = float(x)
    return None if np.isnan(x) else x
