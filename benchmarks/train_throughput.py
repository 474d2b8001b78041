"""Training throughput (img/s): the model step alone vs the full loop on each input path.

    python benchmarks/train_throughput.py                 # CUDA: the paper model at 224 px
    python benchmarks/train_throughput.py --cpu-tiny      # CPU: a tiny model at 32 px (< 2 min)

Every figure runs `Trainer.train_one_epoch`, so it is the real step (mixup, forward and
backward under autocast, SGD, LR schedule, EMA). "model step" feeds it one random batch
already on the device, so it is the ceiling; "dataloader" and "resident" feed it JPEGs
through the CPU DataLoader and the GPU-resident path. The ratio full loop / model step
says whether the input path keeps up (target >= 0.90). Each measurement follows a warm-up
epoch (worker start-up, torch.compile). Record results in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.common import tracking  # noqa: E402
from components.training.dataset import SplitDataset  # noqa: E402
from components.training.batches import make_input  # noqa: E402
from components.common.labels import CLASSES  # noqa: E402
from components.training.losses import SoftTargetCrossEntropy  # noqa: E402
from components.training.samplers import make_sampler  # noqa: E402
from components.common.config import TrainConfig  # noqa: E402
from components.training.trainer import Trainer, init_runtime  # noqa: E402
from components.common.images import resize_size  # noqa: E402


class RandomBatches:
    """The "model step" input: one random batch, already on the device, `steps` times."""

    def __init__(self, batch_size: int, img_size: int, steps: int, device: torch.device):
        self.images = torch.randn(batch_size, 3, img_size, img_size, device=device)
        self.labels = torch.randint(0, len(CLASSES), (batch_size,), device=device)
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int = 0):
        for _ in range(self.steps):
            yield self.images.clone(), self.labels  # mixup scales its input in place


def write_images(folder: Path, n: int, img_size: int) -> SplitDataset:
    """n JPEGs shaped like preprocess output (short side img_size*256/224, 4:3)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    short = resize_size(img_size)
    rows = []
    for i in range(n):
        pixels = rng.integers(0, 256, (short, short * 4 // 3, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"b{i:05d}.jpg", quality=90)
        rows.append({"image": f"b{i:05d}", "label": i % len(CLASSES)})
    return SplitDataset(pd.DataFrame(rows), folder)


def measure(cfg: TrainConfig, rt, make_train_input, repeats: int = 2) -> float:
    """img/s: the best of `repeats` epochs after a warm-up epoch (best-of damps the noise of
    a shared machine)."""
    trainer = Trainer(cfg, rt, make_train_input(), None, SoftTargetCrossEntropy(), tracking.Run(),
                      Path(tempfile.gettempdir()), {})
    trainer.train_one_epoch(0)
    return max(trainer.train_one_epoch(1 + i)["train_img_per_s"] for i in range(repeats))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-tiny", action="store_true",
                   help="tiny model, 32 px, few images: the CPU check")
    p.add_argument("--batch_sizes", default="32,128")
    p.add_argument("--modes", default=None, help="eager,compiled (CPU default: eager)")
    p.add_argument("--n_images", type=int, help="JPEGs per epoch (default 2560; CPU 384)")
    p.add_argument("--num_workers", type=int, default=8)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    rt = init_runtime()
    tiny = args.cpu_tiny or rt.device.type == "cpu"
    base = TrainConfig(num_workers=2 if tiny else args.num_workers, drop_path_rate=0.1,
                       **(dict(preset="tiny", img_size=32)
                          if tiny else {}))
    n_images = args.n_images or (384 if tiny else 2560)
    modes = (args.modes or ("eager" if rt.device.type == "cpu" else "eager,compiled")).split(",")
    dataset = write_images(Path(tempfile.mkdtemp()) / "images", n_images, base.img_size)
    resident_ok = rt.device.type == "cuda" or tiny  # on the CPU "resident" = in host memory

    device = torch.cuda.get_device_name() if rt.device.type == "cuda" else "cpu"
    print(f"device: {device}; model dims {base.dims or 'paper'}, {base.img_size} px, "
          f"{n_images} images, {torch.get_num_threads()} threads")
    print(f"{'mode':9} {'batch':>5} {'input':12} {'img/s':>9} {'/ step':>7}")
    results = []
    for mode in modes:
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            cfg = TrainConfig(**{**base.as_dict(), "batch_size": batch_size,
                                 "compile": mode == "compiled"})
            steps = n_images // batch_size
            sampler = make_sampler(dataset.targets, torch.ones(len(CLASSES)), seed=0)
            paths = {"model step":
                     lambda: RandomBatches(batch_size, cfg.img_size, steps, rt.device)}
            for name, resident in (("dataloader", False), ("resident", True)):
                if resident and not resident_ok:
                    continue
                paths[name] = lambda resident=resident: make_input(
                    dataset, resident=resident, augment=True, img_size=cfg.img_size,
                    batch_size=batch_size, device=rt.device, sampler=sampler, drop_last=True,
                    num_workers=cfg.loader_workers())
            step = None
            for name, build in paths.items():
                ips = measure(cfg, rt, build)
                step = step or ips
                results.append({"device": device, "mode": mode, "batch": batch_size,
                                "input": name, "img_per_s": round(ips, 1),
                                "ratio_to_model_step": round(ips / step, 3)})
                print(f"{mode:9} {batch_size:5d} {name:12} {ips:9.1f} {ips / step:7.2f}",
                      flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
