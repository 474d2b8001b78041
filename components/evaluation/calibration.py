"""Temperature scaling (Guo et al., "On calibration of modern neural networks", ICML 2017) and
the proper scores that judge it: NLL, Brier, and the top-label ECE of metrics.py.

One scalar T divides the logits. Why not per-class (vector) scaling or isotonic regression:
both fit a parameter or a curve per class, and the validation split holds a few dozen images of
the rare classes (DF, VASC), so they would fit noise; one T cannot change the top class or the
ranking of one class's scores, so it leaves accuracy and every ROC curve as they were.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from components.common.decisions import stage_features
from components.evaluation.metrics import expected_calibration_error

# T searched in [1/20, 20] on a log scale: wide enough for any trained network seen here.
LOG_T_BOUNDS = (-np.log(20.0), np.log(20.0))


def nll(y_true, log_probs: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    return float(-np.mean(log_probs[np.arange(len(y_true)), y_true]))


def brier(y_true, probs: np.ndarray) -> float:
    """Multi-class Brier score: mean squared distance to the one-hot truth (sum over classes)."""
    onehot = np.eye(probs.shape[1])[y_true]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def fit_temperature(logits: np.ndarray, y_true) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) on these (validation) images."""
    logits, y_true = np.asarray(logits, dtype=np.float64), np.asarray(y_true)
    result = minimize_scalar(lambda log_t: nll(y_true, log_softmax(logits / np.exp(log_t), axis=1)),
                             bounds=LOG_T_BOUNDS, method="bounded")
    return float(np.exp(result.x))


def scaled_probs(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def rescale_probs(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature scaling of probabilities: softmax(log p / T), equal to softmax(logits / T)
    for p = softmax(logits) (the shift by logsumexp cancels); for the mean probabilities of the
    four flips (evaluate --tta) it is the same map applied to that mean."""
    with np.errstate(divide="ignore"):
        return softmax(np.log(np.asarray(probs, dtype=np.float64)) / temperature, axis=1)


def scores(y_true, probs: np.ndarray) -> dict:
    """NLL, Brier and ECE of probabilities (metrics.json's `calibration` before / after)."""
    with np.errstate(divide="ignore"):
        log_p = np.log(np.clip(probs, 1e-300, None))
    return {"nll": nll(y_true, log_p), "brier": brier(y_true, probs),
            "ece": expected_calibration_error(np.asarray(y_true), probs)}


@torch.inference_mode()
def collect_outputs(model: torch.nn.Module, batches, device: torch.device | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits as float64, features as float32 (decisions.stage_features), labels) of `model`
    in eval mode over (images, labels) batches, in fp32: fitted on what serving computes."""
    was_training = model.training
    model.eval()
    logits, features, labels = [], [], []
    try:
        for images, y in batches:
            if device is not None:
                images = images.to(device)
            out, pooled = stage_features(model, images)
            logits.append(out.float().cpu().numpy().astype(np.float64))
            features.append(pooled.cpu().numpy())
            labels.append(np.asarray(y.cpu() if torch.is_tensor(y) else y))
    finally:
        model.train(was_training)
    return (np.concatenate(logits), np.concatenate(features),
            np.concatenate(labels).astype(np.int64))
