"""A Dataset over one split CSV (`image,label[,lesion_id]`) and the folder of prepared images.

Training uses it with the augmenting transform, evaluation and prediction with
`transforms.eval_transform`. Every image path is resolved when the dataset is built, so a
missing image fails at once with its name rather than mid-epoch. Labels are read by
`labels.read_labels`, so every accepted label format works.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from components.common.labels import image_index, read_labels


def read_split(csv_path: str | os.PathLike) -> pd.DataFrame:
    """A split CSV as columns image, label (index into CLASSES), class_name[, lesion_id]."""
    return read_labels(csv_path)


def load_rgb(path: str | os.PathLike) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


class SplitDataset(Dataset):
    """(image tensor, label) pairs for the rows of a split frame.

    Args:
        frame: from `read_split` (or a subset of it).
        img_dir: folder holding the images.
        transform: applied to the PIL image, e.g. `transforms.eval_transform(224)`.
    """

    def __init__(self, frame: pd.DataFrame, img_dir: str | os.PathLike,
                 transform: Callable | None = None):
        self.frame = frame.reset_index(drop=True)
        self.img_dir = Path(img_dir)
        self.transform = transform
        found = image_index(self.img_dir)  # one directory listing, not a stat per image
        if missing := [image for image in self.frame["image"] if image not in found]:
            raise FileNotFoundError(f"{len(missing)} images not found in {self.img_dir}, e.g. "
                                    f"{missing[:3]}")
        self.paths = [found[image] for image in self.frame["image"]]
        self.targets = torch.tensor(self.frame["label"].to_numpy(dtype="int64", copy=True))

    @classmethod
    def from_csv(cls, csv_path: str | os.PathLike, img_dir: str | os.PathLike,
                 transform: Callable | None = None) -> "SplitDataset":
        return cls(read_split(csv_path), img_dir, transform)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        """item: an index, or (index, seed) from batches.SeededSampler: the transform's random
        draws then come from that seed, and the process's own generator is left as it was."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        image = load_rgb(self.paths[index])
        if self.transform is not None:
            if seed is None:
                image = self.transform(image)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    image = self.transform(image)
        return image, int(self.targets[index])
