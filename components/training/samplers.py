"""Training samplers: inverse-frequency weighted or plain shuffling, one process or DDP.

Every sampler here is replayable: `set_epoch(epoch)` fixes its draw from (seed, epoch), so a
resumed run draws exactly what an uninterrupted one would have.
"""
from __future__ import annotations

import math
import random
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DistributedSampler, Sampler, WeightedRandomSampler


def epoch_seed(seed: int, epoch: int) -> int:
    """One seed per (run seed, epoch) for every per-epoch generator."""
    return seed * 100_003 + epoch


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators (mixup and drop path draw from them)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EpochWeightedRandomSampler(WeightedRandomSampler):
    """torch's WeightedRandomSampler with a generator reseeded by `set_epoch`."""

    def __init__(self, weights: torch.Tensor, num_samples: int, seed: int = 0):
        super().__init__(weights, num_samples, replacement=True, generator=torch.Generator())
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(epoch_seed(self.seed, epoch))


class DistributedWeightedSampler(Sampler[int]):
    """Weighted sampling with replacement, split across DDP ranks.

    torch has no distributed weighted sampler (WeightedRandomSampler is single-process,
    DistributedSampler cannot weight), hence this one: every rank draws the same global
    sequence from (seed, epoch), padded to a multiple of the world size, and keeps every
    `num_replicas`-th index starting at its rank, so the shards are disjoint and together
    follow the weights.
    """

    def __init__(self, weights: torch.Tensor, num_samples: int, num_replicas: int, rank: int,
                 seed: int = 0):
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.num_samples = math.ceil(num_samples / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        indices = torch.multinomial(self.weights, self.total_size, replacement=True,
                                    generator=generator)
        return iter(indices[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


class DeferredSampler(Sampler[int]):
    """Deferred re-sampling (DRS; Cao et al., "Learning Imbalanced Datasets with
    Label-Distribution-Aware Margin Loss", NeurIPS 2019, sec. 3.3): plain shuffles for the first
    `defer_epochs` epochs, so that the features are learnt on the natural distribution, then
    the weighted sampler. torch has no sampler that changes with the epoch, hence this one."""

    def __init__(self, plain: Sampler[int], weighted: Sampler[int], defer_epochs: int):
        self.plain, self.weighted, self.defer_epochs = plain, weighted, defer_epochs
        self.epoch = 0

    def _current(self) -> Sampler[int]:
        return self.weighted if self.epoch >= self.defer_epochs else self.plain

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._current().set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())


def sample_weights(targets: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """Per-image sampling weight: its class's weight (inverse frequency balances the classes)."""
    return class_weights.double()[targets]


# A (class, site) cell with fewer images keeps its natural share: spreading a class's draws
# evenly would repeat, say, HAM10000's two vidir_molemax melanomas hundreds of times an epoch.
MIN_SITE_CELL = 20


def class_site_weights(targets: torch.Tensor, sites, class_weights: torch.Tensor) -> torch.Tensor:
    """Per-image weights that keep each class's total (its class weight) and spread it evenly
    over the sites that hold at least MIN_SITE_CELL images of the class.

    With inverse-frequency weights alone a class is drawn from wherever it happens to be
    collected (HAM10000: nevi mostly from vidir_molemax, melanomas never), so the site predicts
    the class. Balancing the groups (class x site) is the resampling of Sagawa et al. (ICLR
    2020) and Idrissi et al. ("Simple data balancing achieves competitive worst-group-accuracy",
    CLeaR 2022); torch and timm have no group sampler, hence this function.
    """
    base = sample_weights(targets, class_weights)
    frame = pd.DataFrame({"label": targets.numpy(), "site": np.asarray(sites, dtype=str)})
    cell = frame.groupby(["label", "site"])["label"].transform("size").to_numpy()
    weights = base.clone()
    for label, rows in frame.groupby("label").groups.items():
        rows = np.asarray(rows)
        big = rows[cell[rows] >= MIN_SITE_CELL]
        if len(big) == 0:
            continue
        mass = base[big].sum()                    # the big cells' share of the class, kept
        per_site = mass / frame.loc[big, "site"].nunique()
        weights[big] = per_site / torch.as_tensor(cell[big], dtype=torch.double)
    return weights


def make_sampler(targets: torch.Tensor, class_weights: torch.Tensor | None, *, seed: int,
                 num_replicas: int = 1, rank: int = 0, defer_epochs: int = 0,
                 sites=None) -> Sampler[int]:
    """Weighted sampler when `class_weights` is given, else a seeded shuffle; sharded for DDP.
    defer_epochs > 0 (with class_weights): plain shuffles for that many epochs first (DRS).
    `sites` (one per image): balance the sites within each class too (class_site_weights).

    An epoch draws as many images as the split holds (per rank: its share).
    """
    n = len(targets)
    # DistributedSampler with one replica is a plain seeded shuffle with set_epoch.
    plain = DistributedSampler(range(n), num_replicas=num_replicas, rank=rank, shuffle=True,
                               seed=seed)
    if class_weights is None:
        return plain
    weights = (sample_weights(targets, class_weights) if sites is None else
               class_site_weights(targets, sites, class_weights))
    weighted = (EpochWeightedRandomSampler(weights, n, seed=seed) if num_replicas == 1 else
                DistributedWeightedSampler(weights, n, num_replicas, rank, seed=seed))
    return DeferredSampler(plain, weighted, defer_epochs) if defer_epochs > 0 else weighted
