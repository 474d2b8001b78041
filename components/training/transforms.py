"""Image transforms (torchvision.transforms.v2): the paper's training augmentations and the
evaluation resize + centre crop. Both end in a float tensor normalised with ImageNet mean/std.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

from components.common.images import resize_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The paper's augmentations (Ozdemir & Pacal 2025, section "Data augmentation").
RRC_SCALE = (0.8, 1.0)
ROTATION_DEGREES = 15.0
JITTER = dict(brightness=0.2, contrast=0.2, saturation=0.2)


def _to_normalised_tensor() -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def train_transform(img_size: int) -> v2.Compose:
    """Random resized crop (scale 0.8-1.0), horizontal and vertical flips, colour jitter,
    rotation up to 15 degrees; PIL image in, normalised CHW float tensor out."""
    return v2.Compose([
        v2.RandomResizedCrop(img_size, scale=RRC_SCALE, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),  # dermoscopy has no canonical orientation
        v2.ColorJitter(**JITTER),
        v2.RandomRotation(ROTATION_DEGREES),
        *_to_normalised_tensor(),
    ])


def eval_transform(img_size: int) -> v2.Compose:
    """Resize the short side to img_size*256/224, centre-crop img_size, normalise."""
    return v2.Compose([
        v2.Resize(resize_size(img_size), antialias=True),
        v2.CenterCrop(img_size),
        *_to_normalised_tensor(),
    ])
