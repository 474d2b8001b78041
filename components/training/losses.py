"""Cross-entropy for hard labels and mixup's soft targets, with the two long-tail remedies the
recipe can use: per-class loss weights and logit adjustment.

timm's SoftTargetCrossEntropy has neither, and nn.CrossEntropyLoss(weight=w) mis-scales soft
targets (see below), hence this module.
"""
from __future__ import annotations

import torch
from torch import nn


class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy of hard or soft targets, optionally class-weighted and logit-adjusted.

    weight w (per class): sum_i sum_c w_c y_ic (-log p_ic) / sum_i sum_c w_c y_ic. For one-hot
        targets this is exactly nn.CrossEntropyLoss(weight=w). For soft targets
        nn.CrossEntropyLoss(weight=w) divides by the batch size instead, so with mixup the loss
        (and in effect the learning rate) grows with the mean class weight of the batch: with
        the weighted sampler on HAM10000 about 3.7x, and training from scratch at the paper's
        peak lr diverged in the second epoch.
    log_prior, tau: the logit-adjusted loss of Menon et al. (ICLR 2021, eq. 10): softmax over
        f_c(x) + tau * log pi_c, pi the training class prior. Training against the prior-shifted
        logits makes the raw logits f estimate the balanced (class-uniform) posterior, so the
        model is used unchanged at test time.
    """

    def __init__(self, weight: torch.Tensor | None = None, log_prior: torch.Tensor | None = None,
                 tau: float = 1.0):
        super().__init__()
        self.register_buffer("weight", None if weight is None else weight.float())
        offset = None if log_prior is None or tau == 0 else tau * log_prior.float()
        self.register_buffer("logit_offset", offset)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.ndim == 1:
            targets = nn.functional.one_hot(targets, logits.shape[-1]).to(logits.dtype)
        if self.logit_offset is not None:
            logits = logits + self.logit_offset
        nll = -(targets * logits.log_softmax(dim=-1))
        if self.weight is None:
            return nll.sum(dim=-1).mean()
        weighted = targets * self.weight
        return (self.weight * nll).sum() / weighted.sum()
