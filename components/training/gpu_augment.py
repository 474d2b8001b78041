"""GPU-resident input path: the prepared images decoded once and kept as uint8 on the device,
augmented a whole batch at a time where the model runs.

A 1024x1024 JPEG decodes at tens to hundreds per second per core, far under what the GPU
eats (docs/DESIGN.md), so the CPU DataLoader would starve a compiled model. Here each image
is decoded once, resized so its short side is img_size*256/224 and cut to a square around
the centre (the framing `eval_transform` uses), and stored. Per batch, one affine grid per sample
does the random resized crop, both flips and the rotation in a single `grid_sample`; colour
jitter follows as batched brightness / contrast / saturation blends (torchvision's formulas),
then the robustness switches of photometric.py (`photometric: strong`, `field_of_view`).
Everything also runs on the CPU, which is how it is tested.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from components.common.images import resize_size
from components.training.dataset import SplitDataset, load_rgb
from components.training.photometric import field_of_view, strong_colour
from components.training.transforms import (IMAGENET_MEAN, IMAGENET_STD, JITTER, ROTATION_DEGREES,
                                            Augmentation)

RRC_RATIO = (3 / 4, 4 / 3)
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def resident_bytes(n_images: int, img_size: int) -> int:
    side = resize_size(img_size)
    return n_images * 3 * side * side


def fits_on_device(n_images: int, img_size: int, device: torch.device, max_share: float) -> bool:
    """Whether n prepared images fit in `max_share` of the device's free memory (CUDA only)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return resident_bytes(n_images, img_size) <= max_share * free


class _Prepared(Dataset):
    """Decode, resize the short side, cut the square: uint8 CHW (workers decode in parallel)."""

    def __init__(self, dataset: SplitDataset, img_size: int):
        self.paths, self.img_size = dataset.paths, img_size
        self.resize = v2.Compose([v2.Resize(resize_size(img_size), antialias=True),
                                  v2.PILToTensor()])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return square_around_eval_crop(self.resize(load_rgb(self.paths[index])), self.img_size)


def square_around_eval_crop(image: torch.Tensor, img_size: int) -> torch.Tensor:
    """The resize_size-wide square whose centre img_size crop is exactly `eval_transform`'s.

    Two centre crops do not compose into one (each rounds its offset), so the square is placed
    from the final crop's offset rather than centred on its own.
    """
    side = resize_size(img_size)
    h, w = image.shape[-2:]
    inner = int(round((side - img_size) / 2.0))  # torchvision's centre-crop rounding
    top = min(max(int(round((h - img_size) / 2.0)) - inner, 0), h - side)
    left = min(max(int(round((w - img_size) / 2.0)) - inner, 0), w - side)
    return image[..., top:top + side, left:left + side]


class ResidentImages:
    """A split's prepared images (uint8, N x 3 x S x S) and labels, both on `device`."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        self.images, self.targets = images, targets

    @classmethod
    def load(cls, dataset: SplitDataset, img_size: int, device: torch.device,
             num_workers: int = 0) -> "ResidentImages":
        side = resize_size(img_size)
        images = torch.empty((len(dataset), 3, side, side), dtype=torch.uint8, device=device)
        loader = DataLoader(_Prepared(dataset, img_size), batch_size=256, num_workers=num_workers)
        start = 0
        for chunk in loader:  # fill in place: never two copies of the set in host memory
            images[start:start + len(chunk)].copy_(chunk, non_blocking=True)
            start += len(chunk)
        return cls(images, dataset.targets.to(device))

    def __len__(self) -> int:
        return len(self.targets)

    def batches(self, indices, batch_size: int, augment: "GpuAugment", drop_last: bool):
        """Yield (normalised float images, labels) for the sampler's `indices`, batch by batch."""
        order = torch.as_tensor(list(indices), dtype=torch.long, device=self.images.device)
        for chunk in order.split(batch_size):
            if drop_last and len(chunk) < batch_size:
                break
            yield augment(self.images[chunk]), self.targets[chunk]


class GpuAugment:
    """Batched version of `transforms.train_transform` (train=True) or of the eval centre crop.

    Random parameters come from `self.generator` (on the images' device); reseed it to replay
    an epoch exactly.
    """

    def __init__(self, img_size: int, train: bool, device: torch.device | str = "cpu",
                 seed: int = 0, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 augmentation: Augmentation = Augmentation()):
        self.img_size, self.train, self.augmentation = img_size, train, augmentation
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.train:
            x, inside = self._geometric(images)
            x = self._colour(x, inside)
            if self.augmentation.photometric == "strong":
                x = strong_colour(x, self.generator) * inside
            if self.augmentation.field_of_view > 0:
                x = field_of_view(x, self.augmentation.field_of_view, self.generator)
        else:
            x = v2.functional.center_crop(images, [self.img_size, self.img_size]).float().div_(255)
        return (x - self.mean) / self.std

    def _uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        return torch.rand(n, device=self.device, generator=self.generator) * (high - low) + low

    def _geometric(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Random resized crop + flips + rotation as one affine resampling per sample; also
        returns the share of each output pixel that came from inside the image."""
        n = len(images)
        area = self._uniform(n, *self.augmentation.crop_scale)
        log_ratio = self._uniform(n, math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]))
        # Crop width/height as a share of the side. torchvision rejects and redraws crops that
        # do not fit; clamping instead keeps the batch branch-free (it only bites at the
        # extreme aspect ratios, where the crop becomes a full-width strip).
        w = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)
        h = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
        cx = self._uniform(n, -1, 1) * (1 - w)
        cy = self._uniform(n, -1, 1) * (1 - h)
        flip_x = torch.where(self._uniform(n, 0, 1) < 0.5, -1.0, 1.0)
        flip_y = torch.where(self._uniform(n, 0, 1) < 0.5, -1.0, 1.0)
        angle = torch.deg2rad(self._uniform(n, -ROTATION_DEGREES, ROTATION_DEGREES))
        theta = affine_matrices(w * flip_x, h * flip_y, angle, cx, cy)
        # A fourth all-ones channel, resampled alongside, marks where the rotation left the image.
        ones = torch.ones_like(images[:, :1], dtype=torch.float32)
        x = resample(torch.cat([images.float().div_(255), ones], dim=1), theta, self.img_size)
        return x[:, :3], x[:, 3:]

    def _colour(self, x: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast, saturation (fixed order; torchvision shuffles it), with the
        rotation's black corners kept black as in torchvision, which rotates after jitter."""
        n = len(x)
        b = self._factor(n, JITTER["brightness"])
        c = self._factor(n, JITTER["contrast"])
        s = self._factor(n, JITTER["saturation"])
        x = (x * b).clamp_(0, 1)
        gray = _gray(x)
        area = inside.sum((1, 2, 3), keepdim=True).clamp(min=1)
        mean = (gray * inside).sum((1, 2, 3), keepdim=True) / area  # over the image, not corners
        x = (c * x + (1 - c) * mean).clamp_(0, 1)
        x = (s * x + (1 - s) * _gray(x)).clamp_(0, 1)
        return x * inside

    def _factor(self, n: int, strength: float) -> torch.Tensor:
        return self._uniform(n, max(0.0, 1 - strength), 1 + strength).view(n, 1, 1, 1)


def affine_matrices(sx: torch.Tensor, sy: torch.Tensor, angle: torch.Tensor,
                    tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """N x 2 x 3 matrices mapping output to input coordinates (normalised to [-1, 1]):
    rotate the output square by `angle`, scale by (sx, sy) (negative = flip), shift to (tx, ty)."""
    cos, sin = angle.cos(), angle.sin()
    row_x = torch.stack([sx * cos, -sx * sin, tx], dim=1)
    row_y = torch.stack([sy * sin, sy * cos, ty], dim=1)
    return torch.stack([row_x, row_y], dim=1)


def resample(x: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resampling of float images through per-sample affine matrices; zeros outside."""
    grid = F.affine_grid(theta.to(x.dtype), [len(x), x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (x[:, 0:1] * GRAY[0] + x[:, 1:2] * GRAY[1] + x[:, 2:3] * GRAY[2])
