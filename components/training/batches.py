"""The two input paths training and validation read batches from, behind one interface:
`epoch(epoch)` yields (normalised float images, labels) on the device.

- LoaderInput: the CPU DataLoader (PIL decode + torchvision v2 transforms in workers, pinned
  memory, persistent workers). The fallback, and what evaluation uses. Each training sample's
  augmentation is seeded from (run seed, epoch, position in the epoch) (SeededSampler), so a
  resumed run draws exactly what an uninterrupted one would, with any number of workers.
- ResidentInput: the set kept decoded on the device, augmented there (gpu_augment).

`choose_resident` picks the resident path when the set fits the configured share of free GPU
memory ("auto"), always ("on", CPU included: that is how tests cover it), or never ("off").
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from components.common.config import GPU_RESIDENT
from components.training.dataset import SplitDataset
from components.training.gpu_augment import GpuAugment, ResidentImages, fits_on_device
from components.training.samplers import epoch_seed
from components.training.transforms import Augmentation, eval_transform, train_transform

Batch = tuple[torch.Tensor, torch.Tensor]


def choose_resident(mode: str, n_images: int, img_size: int, device: torch.device,
                    max_share: float) -> bool:
    if mode not in GPU_RESIDENT:
        raise ValueError(f"gpu_resident must be one of {', '.join(GPU_RESIDENT)}, got {mode!r}")
    if mode == "auto":
        return fits_on_device(n_images, img_size, device, max_share)
    return mode == "on"


class SeededSampler(Sampler[tuple[int, int]]):
    """Wraps a training sampler: yields (index, augmentation seed) with the seed a function of
    (run seed, epoch, position in the epoch), never of which worker draws it or when.

    torch's DataLoader seeds each worker once, so with persistent workers the augmentations
    depend on the worker's history, and a resumed run (fresh workers) drew differently from
    an uninterrupted one; per-sample seeds make them equal.
    """

    def __init__(self, sampler: Sampler[int], seed: int):
        self.sampler, self.seed, self.epoch = sampler, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = epoch_seed(self.seed, self.epoch) * 1_000_003
        for position, index in enumerate(self.sampler):
            yield int(index), (base + position) % 2**63

    def __len__(self) -> int:
        return len(self.sampler)


class LoaderInput:
    """Batches from a DataLoader over `dataset` (whose transform augments or not)."""

    def __init__(self, dataset: SplitDataset, batch_size: int, device: torch.device, *,
                 sampler: Sampler | None = None, drop_last: bool = False, num_workers: int = 0,
                 seed: int = 0):
        self.sampler = SeededSampler(sampler, seed) if sampler is not None else None
        self.device = device
        workers = dict(persistent_workers=True, prefetch_factor=4) if num_workers > 0 else {}
        # A generator of its own: starting workers draws their base seed from it, not from the
        # global generator that dropout and drop path draw from (a resume starts them anew).
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, shuffle=False,
            drop_last=drop_last, num_workers=num_workers, pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(seed), **workers)

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        for images, labels in self.loader:
            yield (images.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True))


class ResidentInput:
    """Batches gathered from device-resident uint8 images and augmented on the device."""

    def __init__(self, images: ResidentImages, batch_size: int, augment: GpuAugment, *,
                 sampler: Sampler | None = None, drop_last: bool = False, seed: int = 0):
        self.images, self.batch_size, self.augment = images, batch_size, augment
        self.sampler, self.drop_last, self.seed = sampler, drop_last, seed

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.images)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        self.augment.generator.manual_seed(epoch_seed(self.seed, epoch))
        indices = self.sampler if self.sampler is not None else range(len(self.images))
        yield from self.images.batches(indices, self.batch_size, self.augment, self.drop_last)


def make_input(dataset: SplitDataset, *, resident: bool, augment: bool, img_size: int,
               batch_size: int, device: torch.device, sampler: Sampler | None = None,
               drop_last: bool = False, num_workers: int = 0, seed: int = 0,
               augmentation: Augmentation = Augmentation()) -> LoaderInput | ResidentInput:
    """The input for one split: the training augmentations or the eval crop, on either path."""
    if resident:
        images = ResidentImages.load(dataset, img_size, device, num_workers)
        gpu_augment = GpuAugment(img_size, train=augment, device=device, seed=seed,
                                 augmentation=augmentation)
        return ResidentInput(images, batch_size, gpu_augment, sampler=sampler,
                             drop_last=drop_last, seed=seed)
    dataset.transform = (train_transform(img_size, augmentation) if augment else
                         eval_transform(img_size))
    return LoaderInput(dataset, batch_size, device, sampler=sampler, drop_last=drop_last,
                       num_workers=num_workers, seed=seed)
