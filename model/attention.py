"""Separable self-attention (MobileViTv2, Mehta & Rastegari 2022), as used in stages 3-4 of
Ozdemir & Pacal, Sci Rep 2025, 15:4938 (eqs. 5-10).

timm has no separable self-attention block, so this module is the project's own. It works on
NCHW feature maps so that timm's MetaFormerStage/MetaFormerBlock can host it unchanged
(1x1 convolutions are per-token linear maps).
"""
from __future__ import annotations

import torch
from torch import nn


class SeparableSelfAttention(nn.Module):
    """Linear-cost attention: one learned query scores every token, the scores pool the keys
    into a single context vector, and the context gates every value.

    For tokens x_1..x_N (rows of x, width C) and attention width a = attn_ratio * C:

    - eq. 5  context scores      c_s = softmax_N(x W_I),        W_I: C -> 1
    - eq. 6  keys                x_K = x W_K,                   W_K: C -> a
    - eq. 7  context vector      c_v = sum_i c_s(i) x_K(i)      (one vector of width a)
    - eq. 8  values              x_V = ReLU(x W_V),             W_V: C -> a
    - eq. 9  gated values        z_i = c_v * x_V(i)             (broadcast over tokens)
    - eq. 10 output              y_i = z_i W_O,                 W_O: a -> C

    W_I, W_K and W_V are one fused 1x1 convolution (`qkv`, output rows in that order); `proj`
    is W_O. Cost is O(N C a), against O(N^2 C) for dot-product attention.
    """

    def __init__(
        self,
        dim: int,
        attn_ratio: float = 0.5,
        proj_drop: float = 0.0,
        bias: bool = True,
        device=None,
        dtype=None,
        **_unused,  # MetaFormerBlock passes its own kwargs through to the token mixer
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.attn_dim = max(1, int(round(dim * attn_ratio)))
        self.qkv = nn.Conv2d(dim, 1 + 2 * self.attn_dim, kernel_size=1, bias=bias, **dd)
        self.proj = nn.Conv2d(self.attn_dim, dim, kernel_size=1, bias=bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def context_vector(self, x: torch.Tensor) -> torch.Tensor:
        """Eqs. 5-7: (B, C, H, W) -> context vector (B, a, 1, 1); independent of token order."""
        scores, keys, _ = self._project(x)
        return _pool_keys(scores, keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores, keys, values = self._project(x)
        context = _pool_keys(scores, keys)  # eqs. 5-7
        gated = torch.relu(values) * context  # eqs. 8-9
        return self.proj_drop(self.proj(gated))  # eq. 10

    def _project(self, x: torch.Tensor):
        return self.qkv(x).split([1, self.attn_dim, self.attn_dim], dim=1)


def _pool_keys(scores: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Eq. 5 (softmax of the scores over all H*W tokens), then eq. 7 (score-weighted key sum)."""
    weights = scores.flatten(2).softmax(dim=-1).view_as(scores)
    return (weights * keys).sum(dim=(2, 3), keepdim=True)
