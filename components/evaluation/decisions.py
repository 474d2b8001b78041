"""Fitting calibration.json (components/common/decisions.py has its format) on the validation
split, and scoring its fixed thresholds on test.

Everything is chosen on validation and only applied to test: the temperature (calibration.py),
each decision's threshold (the calibrated score's highest threshold whose validation
sensitivity or specificity reaches the target), the OOD threshold (the `in_share` quantile
of the validation images' Mahalanobis score). The OOD statistics (class means, shared
precision matrix) come from the training split, with scikit-learn's Ledoit-Wolf estimator
(shrinkage keeps a covariance of a few hundred features invertible and stable).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score, roc_curve

from components.common import atomic
from components.common.decisions import (DECISIONS, FORMAT, OOD_IN_SHARE, STATS_FILE, check,
                                         decision_scores, mahalanobis, write_stats)
from components.evaluation.calibration import (collect_outputs, fit_temperature, scaled_probs,
                                               scores)
from components.evaluation.metrics import _num, bootstrap


def choose_threshold(positive: np.ndarray, score: np.ndarray, target: str, value: float
                     ) -> dict | None:
    """The threshold on `score` (flag when score >= threshold) reaching `target`
    ("specificity" or "sensitivity") >= value, the one with the best other rate; None without
    both positives and negatives."""
    positive = np.asarray(positive, dtype=bool)
    if not 0 < positive.sum() < len(positive):
        return None
    fpr, tpr, thresholds = roc_curve(positive, score)  # thresholds fall, fpr and tpr rise
    if target == "specificity":
        i = int(np.flatnonzero(1 - fpr >= value)[-1])
    elif target == "sensitivity":
        i = int(np.flatnonzero(tpr >= value)[0])
    else:
        raise ValueError(f"decision target must be sensitivity or specificity, got {target!r}")
    return {"threshold": float(min(thresholds[i], 1.0)),  # roc_curve's first threshold is inf
            "sensitivity": float(tpr[i]), "specificity": float(1 - fpr[i]),
            "n_positive": int(positive.sum()), "n_negative": int((~positive).sum())}


def ood_statistics(features: np.ndarray, y: np.ndarray) -> dict:
    """Class means and the shared precision matrix of the training split's features."""
    features = np.asarray(features, dtype=np.float64)
    present = np.unique(y)
    means = np.stack([features[y == c].mean(axis=0) for c in present])
    centred = features - means[np.searchsorted(present, y)]
    return {"means": means, "precision": LedoitWolf().fit(centred).precision_}


def fit(logits: np.ndarray, features: np.ndarray, y_true: np.ndarray, stats: dict,
        classes: list[str], weights_digest: str, source: str = "") -> dict:
    """calibration.json's content from the validation split's logits, features and labels and
    the training split's OOD statistics (its stats_sha256 is set when written)."""
    y_true = np.asarray(y_true)
    temperature = fit_temperature(logits, y_true)
    probs = scaled_probs(logits, temperature)
    decisions = {}
    for name, d in DECISIONS.items():
        positive = np.isin(y_true, [classes.index(c) for c in d["classes"]])
        chosen = choose_threshold(positive, decision_scores(probs, classes, d), d["target"],
                                  d["value"])
        if chosen is not None:  # a validation split without melanomas decides nothing
            decisions[name] = {**d, "threshold": chosen["threshold"],
                               "validation": {k: v for k, v in chosen.items() if k != "threshold"}}
    score = mahalanobis(features, stats)
    fitted = {"format": FORMAT, "weights_digest": weights_digest,
              "fitted_on": {"split": "validation", "source": source, "n_images": len(y_true)},
              "classes": list(classes), "temperature": temperature,
              "validation": {"before": scores(y_true, scaled_probs(logits)),
                             "after": scores(y_true, probs)},
              "decisions": decisions,
              "ood": {"score": "mahalanobis", "reference": "Lee et al., NeurIPS 2018",
                      "features": "every stage's output averaged over space",
                      "statistics_from": "training split", "in_share": OOD_IN_SHARE,
                      "threshold": float(np.quantile(score, OOD_IN_SHARE)),
                      "stats_file": STATS_FILE, "stats_sha256": ""}}
    check(fitted, "fitted calibration")
    return fitted


def fit_model(model: torch.nn.Module, val_batches, train_batches, classes: list[str],
              weights_digest: str, out: str | os.PathLike, device: torch.device | None = None,
              source: str = "") -> dict:
    """Fit calibration.json for `model` (the final EMA weights) on validation (image, label)
    batches, its OOD statistics on un-augmented training batches; write both atomically
    (`out` and ood_stats.safetensors beside it, the statistics first). Returns the file."""
    _, train_features, train_y = collect_outputs(model, train_batches, device)
    stats = ood_statistics(train_features, train_y)
    logits, features, y_true = collect_outputs(model, val_batches, device)
    fitted = fit(logits, features, y_true, stats, classes, weights_digest, source)
    fitted["ood"]["stats_sha256"] = write_stats(Path(out).parent / STATS_FILE, **stats)
    atomic.write_json(out, fitted)
    return fitted


def at_thresholds(y_true, probs: np.ndarray, classes: list[str], fitted: dict, groups=None,
                  n: int = 1000, seed: int = 0) -> dict:
    """Each decision's test sensitivity and specificity at its validation-chosen threshold,
    with percentile bootstrap intervals (over lesions when `groups` is given)."""
    y_true = np.asarray(y_true)
    out = {}
    for name, d in fitted["decisions"].items():
        positive = np.isin(y_true, [classes.index(c) for c in d["classes"]])
        flagged = decision_scores(probs, classes, d) >= d["threshold"]

        def rates(rows, positive=positive, flagged=flagged):
            p, f = positive[rows], flagged[rows]
            with np.errstate(invalid="ignore", divide="ignore"):
                return {"sensitivity": np.sum(p & f) / np.sum(p),
                        "specificity": np.sum(~p & ~f) / np.sum(~p)}

        point = rates(np.arange(len(y_true)))
        out[name] = {"threshold": d["threshold"], "chosen_on": "validation",
                     "target": d["target"], "value": d["value"],
                     **{k: _num(v) for k, v in point.items()},
                     "n_positive": int(positive.sum()), "n_negative": int((~positive).sum()),
                     "ci95": bootstrap(rates, len(y_true), groups, n=n, seed=seed)}
    return out


def ood_auroc(in_features: np.ndarray, out_features: np.ndarray, fitted: dict) -> dict:
    """AUROC of the OOD score separating in-distribution (test) from other images, and the
    share of each that passes the fitted threshold."""
    e_in, e_out = (mahalanobis(f, fitted["stats"]) for f in (in_features, out_features))
    t = fitted["ood"]["threshold"]
    return {"score": fitted["ood"]["score"], "auroc": float(roc_auc_score(
                np.r_[np.zeros(len(e_in)), np.ones(len(e_out))], np.r_[e_in, e_out])),
            "threshold": t, "n_in": len(e_in), "n_out": len(e_out),
            "in_passed": float(np.mean(e_in <= t)), "out_passed": float(np.mean(e_out <= t))}
