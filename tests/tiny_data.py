"""Tiny labelled image sets for the training tests: one colour per class plus noise and a
darker patch, small enough that a tiny model learns them in a few CPU steps."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from components.common.labels import CLASSES

COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40),
           (200, 40, 200), (40, 200, 200), (230, 230, 230), (90, 90, 90)]


def make_images(root: Path, n_per_class: int = 4, size: int = 40, seed: int = 0,
                prefix: str = "img") -> tuple[Path, pd.DataFrame]:
    """Write root/images/<prefix>_<k>.jpg; return (images folder, frame image,label)."""
    rng = np.random.default_rng(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for label in range(len(CLASSES)):
        for _ in range(n_per_class):
            pixels = np.array(COLOURS[label], float) + rng.normal(0, 12, (size, size + 8, 3))
            top, left = rng.integers(0, size // 2, 2)
            pixels[top:top + size // 3, left:left + size // 3] *= 0.6
            name = f"{prefix}_{len(rows):04d}"
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(img_dir / f"{name}.jpg")
            rows.append({"image": name, "label": label})
    return img_dir, pd.DataFrame(rows)


def make_splits(root: Path, n_per_class: int = 4, size: int = 40) -> dict[str, Path]:
    """train/val/test CSVs (integer labels) over one images folder."""
    paths = {}
    for i, split in enumerate(("train", "val", "test")):
        img_dir, frame = make_images(root, n_per_class, size, seed=i, prefix=split)
        paths[split] = root / f"{split}.csv"
        frame.to_csv(paths[split], index=False)
    paths["img_dir"] = img_dir
    return paths


# A model small enough for CPU tests: 4 stages of one block each, trained from scratch (the
# default warm start has its own tests, test_self_supervised.py; here it would only add time).
TINY = ["--preset", "tiny", "--img_size", "32", "--self_supervised_epochs", "0"]


def dvc_project(root: Path, md5: str) -> str:
    """A project folder as `dvc add data/raw` + `git commit` leave it: a git repository whose
    data/raw.dvc records `md5`; returns the commit."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "raw.dvc").write_text(f"outs:\n- md5: {md5}.dir\n  path: raw\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(root)]
    for args in (["init", "-q"], ["add", "data/raw.dvc"], ["commit", "-qm", "data v1"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    return subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()
