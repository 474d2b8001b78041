"""Class balancing for the training recipe: per-class weights (for the loss and/or the
weighted sampler) and class priors (for the logit-adjusted loss).

Methods (each normalised so that the average training image weighs 1, as scikit-learn's
"balanced" does, which keeps the loss scale and so the learning rate comparable):

    balanced          n / (C * n_c): inverse frequency (the paper's; scikit-learn's
                      compute_class_weight("balanced"))
    sqrt              1 / sqrt(n_c): square-root inverse frequency, a milder correction
                      (as a sampler: square-root sampling, Mahajan et al. ECCV 2018)
    effective_number  (1 - beta) / (1 - beta^n_c): class-balanced weights from the effective
                      number of samples (Cui et al., CVPR 2019, eq. 6)
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.utils.class_weight import compute_class_weight

from components.common.config import CLASS_WEIGHT_METHODS as METHODS
from components.common.labels import CLASSES


def weights_for_counts(counts, method: str, beta: float | None = None) -> np.ndarray:
    """Weights per class for `counts` (one per class in CLASSES order); 0 for an absent class.

    Normalised so that sum_c n_c w_c = n: the mean weight over the training images is 1.
    """
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    if method == "balanced":
        labels = np.repeat(np.flatnonzero(present), counts[present].astype(int))
        weights[present] = compute_class_weight("balanced", classes=np.flatnonzero(present),
                                                y=labels)
        return weights
    if method == "sqrt":
        weights[present] = counts[present] ** -0.5
    elif method == "effective_number":
        if beta is None or not 0 <= beta < 1:
            raise ValueError(f"effective_number needs 0 <= beta < 1, got {beta}")
        weights[present] = (1 - beta) / (1 - beta ** counts[present])
    else:
        raise ValueError(f"unknown class weight method {method!r}; choose from {METHODS}")
    return weights * counts.sum() / (counts * weights).sum()


def class_balance(path, frame: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, priors) per class: the class_weights step's JSON, else inverse frequency
    ("balanced") and the class shares of the training split, with a warning for an absent
    class (weight 0: never sampled; the class_weights step refuses such a split)."""
    if path is not None:
        data = json.loads(Path(path).read_text())
        if list(data["classes"]) != list(CLASSES):
            raise ValueError(f"{path}: classes {data['classes']} are not {list(CLASSES)}")
        counts = np.asarray(data["counts"], dtype=np.float64)
        weights = np.asarray(data["weights"], dtype=np.float64)
    else:
        counts = np.bincount(frame["label"].to_numpy(), minlength=len(CLASSES)).astype(float)
        weights = weights_for_counts(counts, "balanced")
        if absent := [c for c, n in zip(CLASSES, counts) if n == 0]:
            warnings.warn(f"the training split has no image of class {', '.join(absent)}: "
                          f"the model cannot learn {'it' if len(absent) == 1 else 'them'}")
    # An absent class gets a tiny prior, not log(0) = -inf, in the logit-adjusted loss.
    priors = np.maximum(counts, 0.5) / counts.sum()
    return (torch.tensor(weights, dtype=torch.float32),
            torch.tensor(priors, dtype=torch.float32))
