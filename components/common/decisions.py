"""The fitted file, calibration.json, and the one function that applies it to logits: what
evaluate scores on test and what the served model answers are the same numbers.

calibration.json (fitted on the validation split with the final EMA weights by
components/evaluation/decisions.py; it travels inside the served model as an artifact):

    format            "skinlesion-calibration/1"
    weights_digest    the weights it was fitted for (checkpoint.weights_digest)
    temperature       T: calibrated probabilities are softmax(logits / T)
    decisions         {name: {classes, target, value, threshold, ...}}: `name` is flagged when
                      the calibrated probability summed over `classes` is >= threshold; the
                      threshold gives `target` (sensitivity or specificity) >= value on validation
    ood               {score: "mahalanobis", stats_file, stats_sha256, threshold, in_share}: an
                      image is in distribution when its OOD score is <= threshold, which lets
                      `in_share` of the validation images pass

ood_stats.safetensors (stats_file, beside it): `means` (classes x features) and `precision`
(features x features) of the training split's features. The OOD score is the Mahalanobis
distance to the nearest class mean under one shared covariance (Lee et al., "A simple unified
framework for detecting out-of-distribution samples and adversarial attacks", NeurIPS 2018),
on every stage's spatially averaged output (stage_features). On HAM10000 it separates the test
split from non-dermoscopy photographs far better than the energy or max-softmax scores, which
computed from the logits alone rank those photos as *more* familiar (benchmarks/RESULTS.md).

Kept in common/: evaluate, train and the served model all apply it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from scipy.special import softmax

from components.common import atomic, outputs

FORMAT = "skinlesion-calibration/1"
# The configured decisions: melanoma versus the rest at 90% specificity (few false alarms on
# benign lesions), malignant (MEL, BCC, SCC) versus benign at 90% sensitivity (few missed
# cancers).
DECISIONS = {
    "melanoma_suspected": {"classes": ["MEL"], "target": "specificity", "value": 0.9},
    "malignant_suspected": {"classes": ["MEL", "BCC", "SCC"], "target": "sensitivity",
                            "value": 0.9},
}
OOD_IN_SHARE = 0.95
NO_FILE = "no calibration fitted for this model: probabilities uncalibrated, no decision flags"
OOD_REASON = "not like the training images (OOD score over the threshold): no decision flags"
STATS_FILE = outputs.OOD_STATS


class CalibrationFileError(ValueError):
    """calibration.json is not one this code wrote."""


def read(path: str | os.PathLike, weights_digest: str | None = None) -> tuple[dict | None, str]:
    """(the fitted file, its OOD statistics under key `stats`, and "") or (None, why not): a
    missing file, or one fitted for other weights. A file that is not one this code wrote (or
    statistics that are not the ones it names) raises CalibrationFileError naming the file."""
    path = Path(path)
    if not path.is_file():
        return None, NO_FILE
    try:
        fitted = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise CalibrationFileError(f"{path}: not valid JSON") from None
    check(fitted, str(path))
    if weights_digest and fitted["weights_digest"] != weights_digest:
        return None, ("the calibration file was fitted for other weights: probabilities "
                      "uncalibrated, no decision flags")
    stats = path.parent / fitted["ood"]["stats_file"]
    if not stats.is_file() or sha256(stats) != fitted["ood"]["stats_sha256"]:
        raise CalibrationFileError(f"{stats}: missing, or not the statistics {path} was fitted "
                                   f"with (stats_sha256)")
    from safetensors.numpy import load_file

    return {**fitted, "stats": load_file(str(stats))}, ""


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_stats(path: str | os.PathLike, means: np.ndarray, precision: np.ndarray) -> str:
    """Write the OOD statistics (safetensors: no pickle); returns the file's sha256."""
    from safetensors.numpy import save_file

    with atomic.atomic_path(path) as tmp:
        save_file({"means": np.ascontiguousarray(means, dtype=np.float64),
                   "precision": np.ascontiguousarray(precision, dtype=np.float64)}, str(tmp))
    return sha256(Path(path))


def check(fitted, source: str) -> None:
    if not isinstance(fitted, dict) or fitted.get("format") != FORMAT:
        raise CalibrationFileError(f"{source}: key 'format' is not {FORMAT!r}")
    t = fitted.get("temperature")
    if not isinstance(t, (int, float)) or not np.isfinite(t) or t <= 0:
        raise CalibrationFileError(f"{source}: key 'temperature' must be a positive number")
    for name, d in (fitted.get("decisions") or {}).items():
        if not isinstance(d, dict) or not isinstance(d.get("threshold"), (int, float)) \
                or not isinstance(d.get("classes"), list):
            raise CalibrationFileError(f"{source}: key 'decisions.{name}' needs classes and "
                                       f"a numeric threshold")
    ood = fitted.get("ood") or {}
    if not isinstance(ood.get("threshold"), (int, float)) or ood.get("stats_file") != STATS_FILE:
        raise CalibrationFileError(f"{source}: key 'ood' needs a numeric threshold and "
                                   f"stats_file {STATS_FILE!r}")
    if not isinstance(fitted.get("weights_digest"), str):
        raise CalibrationFileError(f"{source}: key 'weights_digest' must be a string")


@torch.inference_mode()
def stage_features(net: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, features) of a HybridConvNeXtV2 in one pass; the features are every stage's
    output averaged over space, concatenated (Lee et al. score several layers: the last
    alone separates photos from dermoscopy much worse, benchmarks/ood_scores.py)."""
    h, pooled = net.stem(images), []
    for stage in net.stages:
        h = stage(h)
        pooled.append(h.float().mean(dim=(2, 3)))
    return net.head(h), torch.cat(pooled, dim=1)


def mahalanobis(features: np.ndarray, stats: dict) -> np.ndarray:
    """Squared Mahalanobis distance of each row to the nearest class mean: higher is less like
    the training data."""
    d = np.asarray(features, dtype=np.float64)[:, None, :] - stats["means"][None]
    return np.einsum("ncd,de,nce->nc", d, stats["precision"], d).min(axis=1)


def decision_scores(probs: np.ndarray, classes: list[str], decision: dict) -> np.ndarray:
    """A decision's score: the probability summed over its positive classes."""
    return np.asarray(probs)[:, [classes.index(c) for c in decision["classes"]]].sum(axis=1)


def flags(probs: np.ndarray, classes: list[str], fitted: dict) -> dict[str, np.ndarray]:
    """{decision: bool per row} at the fitted thresholds (probs already calibrated)."""
    return {name: decision_scores(probs, classes, d) >= d["threshold"]
            for name, d in fitted["decisions"].items()}


def answer(logits: np.ndarray, features: np.ndarray, classes: list[str], fitted: dict | None,
           no_file_reason: str = NO_FILE) -> dict:
    """What the served model answers for a batch of logits and features (stage_features):
    {"probs", "ood_score", "in_distribution", "flags": {decision: list of True/False/None},
    "reason": list}. Without a fitted file: plain softmax, no score, flags and
    in_distribution None."""
    n = len(logits)
    if fitted is None:
        return {"probs": softmax(np.asarray(logits, dtype=np.float64), axis=1),
                "ood_score": [None] * n, "in_distribution": [None] * n,
                "flags": {name: [None] * n for name in DECISIONS}, "reason": [no_file_reason] * n}
    probs = softmax(np.asarray(logits, dtype=np.float64) / fitted["temperature"], axis=1)
    score = mahalanobis(features, fitted["stats"])
    inside = score <= fitted["ood"]["threshold"]
    out_flags = {name: [bool(v) if ok else None for v, ok in zip(values, inside)]
                 for name, values in flags(probs, classes, fitted).items()}
    return {"probs": probs, "ood_score": [float(s) for s in score],
            "in_distribution": [bool(v) for v in inside], "flags": out_flags,
            "reason": ["" if ok else OOD_REASON for ok in inside]}
