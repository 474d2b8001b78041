"""Augmentations against site shortcuts, batched: stronger colour changes and the dermoscope's
field of view. One implementation for both input paths: the device-resident path calls them on
a whole batch, the DataLoader path on one image (a batch of one, `SiteAugment`).

Why (issue 29; benchmarks/RESULTS.md, "Robustness study"): HAM10000's acquisition sites differ
in colour, sharpness and the dark circle a contact dermoscope leaves, and a model that can read
the site off those learns the site's class mix instead of the lesion.

- strong photometric: hue, gamma and blur on top of the paper's brightness/contrast/saturation
  jitter, as the ISIC 2018-2019 winners used (Perez et al., "Data augmentation for skin lesion
  analysis", ISIC workshop 2018; Gessert et al., MethodsX 2020).
- field of view: a random black circle around the image, so the vignette no longer tells which
  device took it (Bissoto et al., "Debiasing skin lesion datasets and models? Not so fast",
  CVPR workshops 2020, found such artefacts predictive of the label).

torchvision has hue and blur only with one parameter per call, not one per sample of a batch,
hence these few lines.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

HUE_DEGREES = 18.0        # +-0.05 of the colour wheel: torchvision's hue=0.05
GAMMA = (0.7, 1.4)        # drawn log-uniformly
BLUR_P, BLUR_SIGMA = 0.3, (0.2, 1.0)   # sigma in pixels of the output
CIRCLE_RADIUS = (0.45, 0.75)           # share of the side: 0.5 touches the edges
CIRCLE_SHIFT = 0.1                     # the circle's centre moves up to this share of the side

# RGB <-> YIQ: a hue change is a rotation of the (I, Q) chroma plane, linear per sample.
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _uniform(n: int, low: float, high: float, like: torch.Tensor,
             generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, device=like.device, generator=generator) * (high - low) + low


def strong_colour(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample hue rotation, gamma and (with probability BLUR_P) Gaussian blur of float
    images in [0, 1], N x 3 x H x W."""
    n = len(x)
    angle = torch.deg2rad(_uniform(n, -HUE_DEGREES, HUE_DEGREES, x, generator))
    cos, sin = angle.cos(), angle.sin()
    rotate = torch.zeros(n, 3, 3, device=x.device)
    rotate[:, 0, 0] = 1
    rotate[:, 1, 1], rotate[:, 1, 2], rotate[:, 2, 1], rotate[:, 2, 2] = cos, -sin, sin, cos
    yiq = _YIQ.to(x.device)
    matrix = torch.linalg.inv(yiq) @ rotate @ yiq                     # N x 3 x 3
    x = torch.einsum("nij,njhw->nihw", matrix, x).clamp_(0, 1)
    gamma = _uniform(n, math.log(GAMMA[0]), math.log(GAMMA[1]), x, generator).exp()
    x = x.clamp(min=1e-6) ** gamma.view(n, 1, 1, 1)
    sigma = _uniform(n, *BLUR_SIGMA, x, generator)
    blurred = _uniform(n, 0, 1, x, generator) < BLUR_P
    return torch.where(blurred.view(n, 1, 1, 1), gaussian_blur(x, sigma), x)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample (reflect padding)."""
    n, c, h, w = x.shape
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-offsets.view(1, -1) ** 2 / (2 * sigma.view(-1, 1) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*c) x k
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"),
                 kernel.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"),
                 kernel.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def field_of_view(x: torch.Tensor, share: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Black out everything outside a random circle in `share` of the images (N x C x H x W)."""
    n, _, h, w = x.shape
    radius = _uniform(n, *CIRCLE_RADIUS, x, generator).view(n, 1, 1)
    cy = _uniform(n, -CIRCLE_SHIFT, CIRCLE_SHIFT, x, generator).view(n, 1, 1)
    cx = _uniform(n, -CIRCLE_SHIFT, CIRCLE_SHIFT, x, generator).view(n, 1, 1)
    chosen = (_uniform(n, 0, 1, x, generator) < share).view(n, 1, 1)
    ys = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) / h - 0.5
    xs = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) / w - 0.5
    inside = (ys.view(1, -1, 1) - cy) ** 2 + (xs.view(1, 1, -1) - cx) ** 2 <= radius ** 2
    return x * (inside | ~chosen).unsqueeze(1).to(x.dtype)


class SiteAugment(torch.nn.Module):
    """The DataLoader path's step: one float image in [0, 1] (C x H x W), the same functions
    as the device-resident path, drawing from torch's generator (seeded per sample there)."""

    def __init__(self, photometric: str, field_of_view_share: float):
        super().__init__()
        self.photometric, self.share = photometric, field_of_view_share

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.unsqueeze(0)
        if self.photometric == "strong":
            x = strong_colour(x)
        if self.share > 0:
            x = field_of_view(x, self.share)
        return x.squeeze(0)
