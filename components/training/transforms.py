"""Image transforms (torchvision.transforms.v2): the paper's training augmentations and the
evaluation resize + centre crop. Both end in a float tensor normalised with ImageNet mean/std.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from components.common.images import resize_size
from components.training.photometric import SiteAugment

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The paper's augmentations (Ozdemir & Pacal 2025, section "Data augmentation").
RRC_SCALE = (0.8, 1.0)
ROTATION_DEGREES = 15.0
JITTER = dict(brightness=0.2, contrast=0.2, saturation=0.2)


@dataclass(frozen=True)
class Augmentation:
    """The training augmentations' settings (TrainConfig's crop_scale, photometric and
    field_of_view): the paper's by default, the robustness study's switches otherwise."""
    crop_scale: tuple[float, float] = RRC_SCALE
    photometric: str = "paper"
    field_of_view: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> "Augmentation":
        return cls(tuple(cfg.crop_scale), cfg.photometric, cfg.field_of_view)

    @property
    def site_augment(self) -> bool:
        return self.photometric != "paper" or self.field_of_view > 0


def _to_normalised_tensor() -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def train_transform(img_size: int, augmentation: Augmentation = Augmentation()) -> v2.Compose:
    """Random resized crop (scale 0.8-1.0), horizontal and vertical flips, colour jitter,
    rotation up to 15 degrees; PIL image in, normalised CHW float tensor out. `augmentation`
    changes the crop's scale and adds photometric.py's steps before the normalisation."""
    site = [SiteAugment(augmentation.photometric, augmentation.field_of_view)] \
        if augmentation.site_augment else []
    *to_float, normalise = _to_normalised_tensor()
    return v2.Compose([
        v2.RandomResizedCrop(img_size, scale=augmentation.crop_scale, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),  # dermoscopy has no canonical orientation
        v2.ColorJitter(**JITTER),
        v2.RandomRotation(ROTATION_DEGREES),
        *to_float, *site, normalise,
    ])


def eval_transform(img_size: int) -> v2.Compose:
    """Resize the short side to img_size*256/224, centre-crop img_size, normalise."""
    return v2.Compose([
        v2.Resize(resize_size(img_size), antialias=True),
        v2.CenterCrop(img_size),
        *_to_normalised_tensor(),
    ])
