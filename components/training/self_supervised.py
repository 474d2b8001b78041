"""Self-supervised warm start: SimCLR on the training split's own images, a stand-in for the
paper's ImageNet-pretrained stages where no weights can be fetched.

Chen et al. 2020 (SimCLR): two augmented views of each image, the backbone and a small
projection head, and the NT-Xent loss that pulls each image's two views together against every
other image of the batch. Azizi et al. 2021 found such pretraining on the task's own unlabelled
dermatology images helps the classifier that starts from it. Labels are never read, and only
the training split's images are seen (a held-out site stays unseen).

`train.self_supervised_epochs: N` runs it inside `train.run` before the classifier's first
epoch; the backbone (every tensor but the head) is then the `pretrained` file the model loads.
Everything lives in OUT/self_supervised/<the training's fingerprint, 12 hex>/: state.pt after
each epoch (a killed pretext resumes, drawing exactly what an uninterrupted one would) and
backbone.safetensors at the end. Another recipe gets another folder: nothing is overwritten.
With DDP each rank takes its share of every batch (its negatives are its share's other views)
and gradients are averaged; rank 0 writes, and every rank then reads the files (the out dir is
shared, as for resuming a DDP training).
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from components.common import atomic
from components.training import checkpoint
from components.common.labels import CLASSES
from components.training.dataset import SplitDataset
from components.training.gpu_augment import GpuAugment, ResidentImages
from components.training.samplers import epoch_seed
from components.training.transforms import Augmentation
from model import HybridConvNeXtV2
from model.pretrained import BACKBONE

FOLDER = "self_supervised"
STATE, BACKBONE_FILE = "state.pt", "backbone.safetensors"
# SimCLR's settings scaled to this data: a batch of 256 images (512 views) gives each view
# 510 negatives; AdamW instead of LARS, which only matters at batches of thousands.
BATCH_SIZE = 256
LR, WEIGHT_DECAY, WARMUP_EPOCHS = 2e-3, 0.05, 1
TEMPERATURE = 0.2
PROJECTION_DIMS = (512, 128)  # hidden, output (SimCLR's 2-layer head, narrowed)
# Views: wider crops than the classifier's and the hue/gamma/blur of `photometric: strong`,
# without which the two views match on colour alone. No grayscale: colour carries diagnosis.
VIEWS = Augmentation(crop_scale=(0.35, 1.0), photometric="strong")


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy (Chen et al. 2020, eq. 1), averaged over
    both views of every image: row i's positive is its other view, the other 2N-2 negatives.
    Written here because neither timm nor torch ships it."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(float("-inf"))  # a view is not its own positive nor a negative
    n = len(z1)
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(similarity, positives)


class Pretext(nn.Module):
    """The classifier's backbone, average-pooled, then SimCLR's projection head."""

    def __init__(self, backbone: HybridConvNeXtV2):
        super().__init__()
        backbone.head = nn.Identity()  # unused here (DDP wants every parameter to get a grad)
        self.backbone = backbone
        self.projection = Mlp(backbone.num_features, PROJECTION_DIMS[0], PROJECTION_DIMS[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.backbone.forward_features(x).mean((2, 3)))


def pretrain(frame: pd.DataFrame, img_dir, out_dir: Path, cfg, fingerprint: str, rt,
             stop_after_epoch: int | None = None) -> Path:
    """SimCLR for cfg.self_supervised_epochs on `frame`'s images (cfg: a TrainConfig, whose
    model settings, img_size and seed it takes; rt: the trainer's Runtime); returns the
    backbone file, or, when `stop_after_epoch` ends it early (as a preemption would), the
    folder holding its state."""
    folder = Path(out_dir) / FOLDER / fingerprint[:12]
    backbone_file = folder / BACKBONE_FILE
    if backbone_file.is_file():
        if rt.is_main:
            print(f"self-supervised: using {backbone_file}", flush=True)
        return backbone_file
    device = rt.device
    torch.manual_seed(cfg.seed)
    model = Pretext(HybridConvNeXtV2(num_classes=len(CLASSES), preset=cfg.preset,
                                     dims=cfg.dims, depths=cfg.depths)).to(device)
    step_model = model if rt.world_size == 1 else DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    images = ResidentImages.load(SplitDataset(frame, img_dir), cfg.img_size, device)
    batch = min(BATCH_SIZE, len(images))
    if batch < 2 * rt.world_size:
        raise ValueError(f"self-supervised warm start: {len(images)} training images are too "
                         f"few for {rt.world_size} processes")
    steps = len(images) // batch
    epochs = cfg.self_supervised_epochs
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, WEIGHT_DECAY), lr=LR)
    warmup = min(WARMUP_EPOCHS, epochs - 1) * steps
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, epochs * steps - warmup),
                                  warmup_t=warmup, warmup_lr_init=LR / 100, warmup_prefix=True,
                                  t_in_epochs=False)
    start = 0
    if (folder / STATE).is_file():
        state = torch.load(folder / STATE, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["epoch"]
    if rt.is_main:
        print(f"self-supervised warm start (SimCLR) on {len(images)} training images, {epochs} "
              f"epochs of {steps} steps, from epoch {start}", flush=True)
    for epoch in range(start, min(epochs, stop_after_epoch or epochs)):
        began, total = time.time(), 0.0
        # Order and views drawn from (seed, epoch) alone: a resumed pretext replays exactly.
        seed = epoch_seed(cfg.seed, epoch)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        views = GpuAugment(cfg.img_size, train=True, device=device, seed=seed + rt.rank,
                           augmentation=VIEWS)
        model.train()
        for step, chunk in enumerate(order[:steps * batch].split(batch)):
            uint8 = images.images[chunk[rt.rank::rt.world_size].to(device)]
            with torch.autocast(device.type, dtype=rt.amp_dtype,
                                enabled=rt.amp_dtype is not None):
                z1, z2 = step_model(torch.cat([views(uint8), views(uint8)])).chunk(2)
            loss = nt_xent(z1, z2)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"self-supervised loss is {loss.item()} at epoch {epoch}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step_update(epoch * steps + step + 1)
            total += loss.item()
        if rt.is_main:
            print(f"self-supervised epoch {epoch + 1}/{epochs}: loss {total / steps:.3f} "
                  f"({time.time() - began:.0f} s)", flush=True)
            checkpoint.save(folder / STATE, {"model": model.state_dict(),
                                             "optimizer": optimizer.state_dict(),
                                             "epoch": epoch + 1})
    if stop_after_epoch is not None and stop_after_epoch < epochs:
        return folder
    if rt.is_main:
        write_backbone(model.backbone, backbone_file)
    rt.barrier()  # the file is there before any rank loads it
    return backbone_file


def write_backbone(model: HybridConvNeXtV2, path: Path) -> None:
    """Every stem and stage tensor (not the head) as safetensors, the file `pretrained` loads."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
               if BACKBONE.match(k)}
    with atomic.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"written_by": __name__})
