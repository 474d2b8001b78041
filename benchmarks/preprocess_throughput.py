"""How fast does preprocess turn large JPEGs into 256-px images: JPEG draft mode on and off,
and what shades-of-grey colour constancy adds.

    .venv/bin/python benchmarks/preprocess_throughput.py [--count 8] [--workers 1]

Makes `count` 4000x3000 JPEGs (camera-like size, smooth content plus noise) in a temporary
folder, then runs components.preprocess.run on them three times (draft; no draft; draft with
colour constancy) and prints images/s. Takes about a minute on two cores.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from components import preprocess
from components.common.labels import CLASSES


def make_images(folder: Path, count: int, size=(4000, 3000), seed: int = 0) -> Path:
    """Write `count` large JPEGs and a one-hot labels CSV; return the CSV's path."""
    rng = np.random.default_rng(seed)
    images = folder / "images"
    images.mkdir(parents=True)
    rows = ["image," + ",".join(CLASSES)]
    for i in range(count):
        base = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
        noise = rng.integers(-12, 13, (size[1], size[0], 3), dtype=np.int16)
        pixels = (np.asarray(base, dtype=np.int16) + noise).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"big_{i:03d}.jpg", "JPEG", quality=90)
        rows.append(f"big_{i:03d}," + ",".join("1" if k == i % len(CLASSES) else "0" for k in range(len(CLASSES))))
    labels = folder / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return labels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=12, help="number of 4000x3000 JPEGs")
    parser.add_argument("--workers", type=int, default=1, help="preprocess worker processes")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        labels = make_images(tmp, args.count)
        mb = sum(p.stat().st_size for p in (tmp / "images").iterdir()) / 1e6
        print(f"made {args.count} JPEGs of 4000x3000 ({mb:.1f} MB) in {time.perf_counter() - start:.1f} s")
        print(f"{'mode':<18} {'workers':>7} {'seconds':>8} {'images/s':>9}")
        runs = (("draft", True, "none"), ("full", False, "none"),
                ("draft + sog", True, "shades_of_gray"))
        for i, (mode, draft, colour) in enumerate(runs):
            start = time.perf_counter()
            preprocess.run(labels, tmp / "images", tmp / f"out-{i}",
                           size=args.size, workers=args.workers, draft=draft,
                           color_constancy=colour)
            seconds = time.perf_counter() - start
            print(f"{mode:<18} {args.workers:>7} {seconds:>8.2f} {args.count / seconds:>9.2f}")


if __name__ == "__main__":
    main()
