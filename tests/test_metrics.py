"""Metrics: the paper's confusion matrix, edge cases, calibration, bootstrap, KFP shapes."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from components.common.labels import CLASSES
from components.evaluation.metrics import (
    HEADLINE,
    bootstrap_intervals,
    classification_metrics,
    expected_calibration_error,
    metrics_from_confusion,
    roc_points,
)
from pipeline.publish import kfp_metrics

# Ozdemir & Pacal 2025, Fig. (test confusion matrix); rows true, columns predicted,
# order AK, BCC, BKL, DF, MEL, NV, SCC, VASC.
PAPER_CM = [
    [110, 6, 5, 0, 3, 3, 3, 0],
    [4, 482, 5, 0, 2, 5, 1, 0],
    [6, 6, 349, 0, 11, 18, 3, 0],
    [0, 1, 2, 29, 0, 4, 0, 0],
    [2, 8, 19, 0, 589, 60, 1, 0],
    [0, 7, 10, 0, 43, 1870, 1, 1],
    [2, 4, 1, 0, 0, 1, 86, 0],
    [0, 0, 0, 0, 0, 0, 0, 38],
]


def _noisy_probs(y, k=8, seed=0, signal=1.5):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(k), len(y))
    p[np.arange(len(y)), y] += signal * rng.random(len(y))
    return p / p.sum(axis=1, keepdims=True)


def test_paper_confusion_matrix():
    m = metrics_from_confusion(PAPER_CM)
    got = [round(m[k], 4) for k in ("accuracy", "precision_macro", "recall_macro", "f1_macro")]
    assert got == [0.9348, 0.9324, 0.9070, 0.9182]
    assert m["balanced_accuracy"] == pytest.approx(m["recall_macro"])


def test_perfect_predictions_score_one_everywhere():
    y = np.repeat(np.arange(8), 5)
    m = classification_metrics(y, np.eye(8)[y], CLASSES)
    for name in HEADLINE:
        assert m[name] == pytest.approx(0.0 if name == "ece" else 1.0), name
    assert all(v == 1.0 for v in m["roc_auc_per_class"].values())
    assert m["absent_classes"] == [] and m["n_images"] == 40
    json.dumps(m, allow_nan=False)


def test_absent_class_is_reported_not_a_crash():
    y = np.repeat(np.arange(7), 6)                      # no SCC in the test set
    probs = _noisy_probs(y)
    probs[0] = np.eye(8)[7]                             # ... but one image predicted SCC
    m = classification_metrics(y, probs, CLASSES)
    assert m["absent_classes"] == ["SCC"]
    scc = m["per_class"]["SCC"]
    assert scc["support"] == 0 and scc["recall"] is None and scc["auc"] is None
    assert scc["precision"] == 0.0
    assert m["roc_auc_per_class"]["SCC"] is None and m["roc_auc_macro"] is not None
    # macro recall averages the seven present classes, as balanced accuracy does
    assert m["recall_macro"] == pytest.approx(m["balanced_accuracy"])
    json.dumps(m, allow_nan=False)


@pytest.mark.parametrize("bad", [0.9, -0.1, np.nan])
def test_bad_probabilities_are_rejected_naming_the_row(bad):
    y = np.arange(8)
    probs = np.eye(8)
    probs[3, 3] = bad
    with pytest.raises(ValueError, match="row 3"):
        classification_metrics(y, probs, CLASSES)


def test_bad_labels_and_shapes_are_rejected():
    with pytest.raises(ValueError, match="row 1"):
        classification_metrics(np.array([0, 9]), np.eye(8)[:2], CLASSES)
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(np.array([0, 1]), np.eye(3)[:2], CLASSES)


def test_ece_of_a_perfectly_calibrated_toy_case_is_zero():
    # every image predicted with confidence 0.8, and 80 % of them right
    y_pred = np.arange(100) % 8
    probs = np.full((100, 8), 0.2 / 7)
    probs[np.arange(100), y_pred] = 0.8
    y = y_pred.copy()
    y[:20] = (y[:20] + 1) % 8
    assert expected_calibration_error(y, probs) == pytest.approx(0.0, abs=1e-12)
    overconfident = np.eye(8)[y_pred]                   # same hits at confidence 1.0
    assert expected_calibration_error(y, overconfident) == pytest.approx(0.2)


def test_bootstrap_is_deterministic_and_contains_the_estimate():
    y = np.repeat(np.arange(8), 25)
    probs = _noisy_probs(y)
    a = bootstrap_intervals(y, probs, n=40, seed=3)
    assert a == bootstrap_intervals(y, probs, n=40, seed=3)
    assert a != bootstrap_intervals(y, probs, n=40, seed=4)
    point = classification_metrics(y, probs, CLASSES)
    for name in HEADLINE:
        assert a[name]["low"] <= point[name] <= a[name]["high"], name


def test_bootstrap_resamples_whole_lesions():
    # two lesions of 50 images each: one all right, one all wrong
    y = np.zeros(100, dtype=int)
    probs = np.eye(8)[np.r_[np.zeros(50, int), np.ones(50, int)]]
    groups = np.r_[np.full(50, "L1", dtype=object), np.full(50, "L2", dtype=object)]
    grouped = bootstrap_intervals(y, probs, groups=groups, n=100)["accuracy"]
    per_image = bootstrap_intervals(y, probs, n=100)["accuracy"]
    assert grouped == {"low": 0.0, "high": 1.0}         # a resample holds 0, 1 or 2 good lesions
    assert 0.35 < per_image["low"] < 0.5 < per_image["high"] < 0.65
    # images without a lesion id are units of their own
    groups[:50] = pd.NA
    assert bootstrap_intervals(y, probs, groups=groups, n=100)["accuracy"]["low"] > 0.2


def test_roc_points_share_one_grid():
    y = np.repeat(np.arange(7), 10)
    pts = roc_points(y, _noisy_probs(y), CLASSES, grid=11)
    assert list(pts) == ["fpr", *CLASSES]
    assert np.all(np.diff(pts["MEL"]) >= 0) and pts["MEL"][-1] == 1.0
    assert np.isnan(pts["SCC"]).all()


def test_kfp_metrics_shapes():
    y = np.repeat(np.arange(8), 10)
    probs = _noisy_probs(y)
    m = classification_metrics(y, probs, CLASSES)
    m["ci95"] = bootstrap_intervals(y, probs, n=20)
    k = kfp_metrics(m, y, probs, max_points=50)
    names = dict(k["scalars"])
    assert names["accuracy"] == m["accuracy"] and "accuracy_ci_low" in names
    assert "roc_auc_MEL" in names and all(isinstance(v, float) for v in names.values())
    assert k["confusion_matrix"]["categories"] == list(CLASSES)
    assert np.sum(k["confusion_matrix"]["matrix"]) == 80
    roc = k["roc"]
    assert len(roc["fpr"]) == len(roc["tpr"]) == len(roc["threshold"]) <= 50
    assert roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0
    assert all(0.0 <= t <= 1.0 for t in roc["threshold"])
    assert kfp_metrics(m)["roc"] is None


def test_kfp_metrics_carry_the_validated_thresholds_calibration_and_ood():
    """What a reviewer of the KFP run needs to act on the model: each decision's threshold
    (chosen on validation) and its test sensitivity/specificity, the temperature and NLL/ECE
    before and after it, the OOD AUROC."""
    y = np.repeat(np.arange(8), 10)
    m = classification_metrics(y, _noisy_probs(y), CLASSES)
    m["decisions"] = {"melanoma_suspected": {"threshold": 0.46, "chosen_on": "validation",
                                             "sensitivity": 0.33, "specificity": 0.91}}
    m["calibration"] = {"temperature": 0.93, "before": {"nll": 1.11, "ece": 0.05},
                        "after": {"nll": 1.10, "ece": 0.06}}
    m["ood"] = {"auroc": 0.97, "threshold": 357.9}
    names = dict(kfp_metrics(m)["scalars"])
    assert names["melanoma_suspected_threshold"] == 0.46
    assert names["melanoma_suspected_sensitivity"] == 0.33
    assert names["melanoma_suspected_specificity"] == 0.91
    assert names["temperature"] == 0.93 and names["nll_before"] == 1.11 and names["ece_after"] == 0.06
    assert names["ood_auroc"] == 0.97 and names["ood_threshold"] == 357.9
