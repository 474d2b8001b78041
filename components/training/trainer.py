"""The training loop: model, EMA, optimiser and schedule; one epoch of training; validation of
the raw and EMA weights; per-epoch checkpoints and MLflow metrics.

`components.train` prepares the data and settings and calls `fit`. The loop is the paper's
recipe: SGD (momentum 0.9) with linear warm-up then cosine decay, mixup, model EMA,
class-weighted cross-entropy, optionally on top of a weighted sampler.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from timm.data import Mixup
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model import HybridConvNeXtV2

from components.common import outputs
from components.training import checkpoint
from components.training.samplers import epoch_seed, seed_everything
from components.common.labels import CLASSES
from components.training.transforms import IMAGENET_MEAN, IMAGENET_STD

BEST_METRIC = "val_ema_balanced_accuracy"  # the EMA weights are the model that ships
LAST, BEST, EMA_WEIGHTS = outputs.CHECKPOINT_LAST, outputs.CHECKPOINT_BEST, outputs.EMA_WEIGHTS


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or inf: the run stops before writing that epoch."""


@dataclass
class Runtime:
    """Where this process trains: device, DDP rank and world, autocast dtype."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_runtime() -> Runtime:
    """One process, or a DDP rank when started by torchrun (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    # bf16 where the GPU has it (no loss scaling needed), else fp16; the CPU trains in fp32.
    amp = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None
    return Runtime(device, int(os.environ.get("RANK", "0")), world_size, amp)


@dataclass
class State:
    """What the loop carries from epoch to epoch (and a checkpoint restores)."""
    epoch: int = 0
    step: int = 0
    best: dict | None = None
    history: list[dict] = field(default_factory=list)


class Trainer:
    """Builds the training objects from `cfg` (a common.config.TrainConfig) and runs epochs.

    Args:
        train_input / val_input: components.training.batches objects (val_input None: no
            validation).
        criterion: the loss of (logits, hard or mixup targets); losses.SoftTargetCrossEntropy.
        run: the tracking.Run to log to.
        pretrained: weights to start from instead of cfg.pretrained (the warm start's backbone).
    """

    def __init__(self, cfg, rt: Runtime, train_input, val_input, criterion: nn.Module, run,
                 out_dir: Path, run_config: dict, lineage: dict | None = None,
                 pretrained: str | None = None):
        self.cfg, self.rt, self.run, self.out_dir = cfg, rt, run, Path(out_dir)
        self.train_input, self.val_input = train_input, val_input
        self.run_config = run_config
        self.lineage = lineage or {}  # prepare_size, split_hash: stored with the weights
        self.state = State()

        self.model = HybridConvNeXtV2(
            num_classes=len(CLASSES), preset=cfg.preset, pretrained=pretrained or cfg.pretrained,
            drop_path_rate=cfg.drop_path_rate, dims=cfg.dims, depths=cfg.depths,
        ).to(rt.device)
        if rt.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        # The EMA copies the model before any DDP / compile wrapper, as timm advises.
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup)
        self.train_model: nn.Module = self.model
        if rt.world_size > 1:
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)

        # peak_lr is for one process's batch; with W processes the effective batch is
        # W * batch_size and, with lr_scaling "linear" (Goyal et al. 2017), the rate W * peak_lr.
        self.lr_scale = rt.world_size if cfg.lr_scaling == "linear" else 1
        # No weight decay on norms and biases (timm's practice; the paper gives one value).
        self.optimizer = torch.optim.SGD(
            param_groups_weight_decay(self.model, cfg.weight_decay),
            lr=cfg.peak_lr * self.lr_scale, momentum=cfg.momentum)
        self.steps_per_epoch = len(train_input)
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training split gives no full batch of {cfg.batch_size}")
        # Stepped per iteration, not per epoch: a smooth warm-up whatever the epoch count, and
        # short runs still see the whole warm-up + cosine shape.
        warmup = cfg.warmup_epochs * self.steps_per_epoch
        self.scheduler = CosineLRScheduler(
            self.optimizer, t_initial=max(1, cfg.epochs * self.steps_per_epoch - warmup),
            lr_min=cfg.min_lr * self.lr_scale, warmup_t=warmup, warmup_lr_init=cfg.warmup_lr,
            warmup_prefix=True, t_in_epochs=False)
        # Loss scaling only matters for fp16; with bf16 or fp32 the scaler is a no-op.
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
        self.criterion = criterion.to(rt.device)
        self.mixup = (Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=0.0, label_smoothing=0.0,
                            num_classes=len(CLASSES)) if cfg.mixup_alpha > 0 else None)

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, stop_after_epoch: int | None = None) -> State:
        """Train from `self.state.epoch` to cfg.epochs (or stop_after_epoch), checkpointing
        and logging after every epoch."""
        last_epoch = min(self.cfg.epochs, stop_after_epoch or self.cfg.epochs)
        for epoch in range(self.state.epoch, last_epoch):
            if not self.rt.is_main:
                # Rank 0's generators travel in the checkpoint; the others' draws (mixup, drop
                # path) are a function of (seed, rank, epoch), so a resumed run repeats them.
                seed_everything(epoch_seed(self.cfg.seed + self.rt.rank, epoch))
            metrics = self.train_one_epoch(epoch)
            if self.val_input is not None and self.rt.is_main:
                metrics |= self.validate(self.model, "val")
                metrics |= self.validate(self.ema.module, "val_ema")
            self.state.epoch = epoch + 1
            if self.rt.is_main:
                self.end_epoch(metrics)
            self.rt.barrier()
        return self.state

    def train_one_epoch(self, epoch: int) -> dict:
        cfg, rt = self.cfg, self.rt
        self.train_model.train()
        loss_sum = torch.zeros((), device=rt.device)
        finite = torch.ones((), dtype=torch.bool, device=rt.device)
        seen, start = 0, time.perf_counter()
        bar = tqdm(self.train_input.epoch(epoch), total=self.steps_per_epoch,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not rt.is_main or None,
                   dynamic_ncols=True, leave=False)
        for i, (images, labels) in enumerate(bar):
            if rt.device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            targets = labels
            if self.mixup is not None:
                images, targets = self.mixup(images, labels)
            with self.autocast():
                logits = self.train_model(images)
            loss = self.criterion(logits.float(), targets)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.state.step += 1
            self.scheduler.step_update(self.state.step)
            if rt.is_main:  # only rank 0 validates, saves and ships the EMA weights
                self.ema.update(self.model, step=self.state.step)
            loss_sum += loss.detach() * len(images)
            finite &= torch.isfinite(loss.detach())
            seen += len(images)
            if i % 10 == 0 or i == self.steps_per_epoch - 1:  # .item() syncs: not every step
                if not finite.item():
                    raise NonFiniteLoss(
                        f"the training loss became {loss.item()} in epoch {epoch + 1} (by step "
                        f"{self.state.step}); nothing of this epoch was saved. Lower --peak_lr, "
                        f"set --grad_clip, or check the inputs; --resume continues from the last "
                        f"checkpoint")
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{self.lr():.2e}",
                                img_s=f"{seen * rt.world_size / (time.perf_counter() - start):.0f}")
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
        seconds = time.perf_counter() - start
        totals = torch.stack([loss_sum, torch.tensor(float(seen), device=rt.device)])
        if rt.world_size > 1:
            dist.all_reduce(totals)
        return {"train_loss": (totals[0] / totals[1]).item(), "lr": self.lr(),
                "epoch_seconds": seconds, "train_img_per_s": totals[1].item() / seconds}

    def autocast(self):
        return torch.autocast(self.rt.device.type, dtype=self.rt.amp_dtype,
                              enabled=self.rt.amp_dtype is not None)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @torch.inference_mode()
    def predict(self, model: nn.Module, batches) -> tuple[np.ndarray, np.ndarray]:
        """(true labels, predicted labels) of `model` over an input's batches."""
        was_training = model.training
        model.eval()
        true, pred = [], []
        for images, labels in batches:
            if self.rt.device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                pred.append(model(images).argmax(1).cpu())
            true.append(labels.cpu())
        model.train(was_training)
        return torch.cat(true).numpy(), torch.cat(pred).numpy()

    def validate(self, model: nn.Module, prefix: str, input_=None) -> dict:
        true, pred = self.predict(model, (input_ or self.val_input).epoch())
        return {f"{prefix}_{k}": v for k, v in classification_scores(true, pred).items()}

    # -- after each epoch (main rank) -------------------------------------------------------
    def end_epoch(self, metrics: dict) -> None:
        state = self.state
        state.history.append({"epoch": state.epoch, **metrics})
        improved = BEST_METRIC in metrics and (
            state.best is None or metrics[BEST_METRIC] > state.best["value"])
        if improved:
            state.best = {"epoch": state.epoch, "metric": BEST_METRIC,
                          "value": metrics[BEST_METRIC]}
        checkpoint.save(self.out_dir / LAST, self.checkpoint_state(),
                        keep_previous=checkpoint.PREV)
        if improved:  # the same file: linked, so a full disk cannot fail between the two
            checkpoint.link(self.out_dir / LAST, self.out_dir / BEST)
        self.run.log_metrics(metrics, step=state.epoch)
        tqdm.write(epoch_line(state.epoch, self.cfg.epochs, metrics, improved))

    def model_meta(self) -> dict:
        return {"model_config": self.model.config, "classes": list(CLASSES),
                "img_size": self.cfg.img_size, "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD),
                **{k: self.lineage.get(k) for k in checkpoint.LINEAGE_KEYS}}

    def checkpoint_state(self) -> dict:
        return {
            **self.model_meta(),
            "model": self.model.state_dict(), "ema": self.ema.module.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": checkpoint.rng_state(),
            "sampler": {"seed": self.cfg.seed},
            "epoch": self.state.epoch, "step": self.state.step, "best": self.state.best,
            "history": self.state.history, "mlflow_run_id": self.run.run_id,
            "train_config": self.run_config,
        }

    def restore(self, ckpt: dict) -> None:
        """Continue from a checkpoint_state() dict (rank 0's RNG; other ranks reseed)."""
        if ckpt["model_config"] != self.model.config:
            raise checkpoint.CheckpointError(
                f"the checkpoint's model {ckpt['model_config']} differs from the configured "
                f"{self.model.config}")
        self.model.load_state_dict(ckpt["model"])
        self.ema.module.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state = State(ckpt["epoch"], ckpt["step"], ckpt["best"], list(ckpt["history"]))
        if self.rt.is_main:
            checkpoint.set_rng_state(ckpt["rng"])

    def restore_best_link(self, resumed: Path) -> None:
        """After restore(resumed): when the resumed checkpoint is itself the best epoch but
        checkpoint_best.pt is another file (the run stopped between the two, or an earlier
        version's write of it failed), link it again; otherwise it would stay wrong for good."""
        best, path = self.state.best, self.out_dir / BEST
        if best is None:
            return
        if best["epoch"] == self.state.epoch:
            if not (path.exists() and path.samefile(resumed)):
                checkpoint.link(resumed, path)
        elif not path.exists():
            print(f"warning: {path} (best epoch {best['epoch']}) is missing and cannot be "
                  f"rebuilt; a later better epoch will write it again", file=sys.stderr,
                  flush=True)

    def save_ema_weights(self) -> Path:
        """The shipped model: EMA weights + what load_model needs, no training state."""
        path = self.out_dir / EMA_WEIGHTS
        checkpoint.save(path, {**self.model_meta(), "ema": self.ema.module.state_dict(),
                               "epoch": self.state.epoch, "step": self.state.step})
        return path


def classification_scores(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro F1 (over the classes present, as balanced
    accuracy averages them)."""
    present = np.unique(true)
    return {"accuracy": float(accuracy_score(true, pred)),
            "balanced_accuracy": float(balanced_accuracy_score(true, pred)),
            "macro_f1": float(f1_score(true, pred, labels=present, average="macro",
                                       zero_division=0))}


def epoch_line(epoch: int, epochs: int, m: dict, improved: bool) -> str:
    """The one-line summary printed after each epoch."""
    line = f"epoch {epoch}/{epochs}  loss {m['train_loss']:.4f}  lr {m['lr']:.2e}"
    for prefix, name in (("val", "val"), ("val_ema", "ema")):
        if f"{prefix}_accuracy" in m:
            line += (f"  {name} acc {m[f'{prefix}_accuracy']:.3f} bacc "
                     f"{m[f'{prefix}_balanced_accuracy']:.3f} f1 {m[f'{prefix}_macro_f1']:.3f}")
    line += f"  {m['epoch_seconds']:.1f}s {m['train_img_per_s']:.0f} img/s"
    return line + ("  *best*" if improved else "")
