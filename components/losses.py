"""Class-weighted cross-entropy that treats hard labels and mixup's soft targets alike."""
from __future__ import annotations

import torch
from torch import nn


class WeightedSoftTargetCrossEntropy(nn.Module):
    """sum_i sum_c w_c y_ic (-log p_ic) / sum_i sum_c w_c y_ic, for hard or soft targets.

    For one-hot targets this is exactly nn.CrossEntropyLoss(weight=w). For soft targets
    nn.CrossEntropyLoss(weight=w) divides by the batch size instead, so with mixup the loss
    (and in effect the learning rate) grows with the mean class weight of the batch: with the
    weighted sampler on HAM10000 about 3.7x, and training from scratch at the paper's peak lr
    diverged in the second epoch. timm's SoftTargetCrossEntropy has no class weights.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.float())

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.ndim == 1:
            targets = nn.functional.one_hot(targets, logits.shape[-1]).to(logits.dtype)
        weighted = targets * self.weight
        return -(weighted * logits.log_softmax(dim=-1)).sum() / weighted.sum()
