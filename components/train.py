"""Train the hybrid ConvNeXtV2 classifier: `python -m components.train` (or `skinlesion train`).

Settings come from the paper's recipe (TrainConfig's defaults), then `--config params.yaml`'s
`train` section, then the flags. Writes into --out_dir: checkpoint_last.pt every epoch,
checkpoint_best.pt on a better validation balanced accuracy of the EMA weights,
ema_weights.pt and training_summary.json at the end. Logs one MLflow run (see tracking.py).

    python -m components.train --train_csv data/splits/train.csv --val_csv data/splits/val.csv \\
        --img_dir data/prepared/images --class_weights data/class_weights.json \\
        --out_dir outputs/train

Under `torchrun --nproc_per_node N -m components.train ...` it trains with DDP; only rank 0
validates, checkpoints and logs.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import random
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import yaml
from sklearn.utils.class_weight import compute_class_weight

from . import atomic, checkpoint, tracking
from .dataset import SplitDataset, read_split
from .inputs import choose_resident, make_input
from .labels import CLASSES, LabelError
from .samplers import epoch_seed, make_sampler
from .trainer import BEST, LAST, Runtime, Trainer, init_runtime

LOCK = ".train.lock"
SUMMARY = "training_summary.json"


class TrainingRefused(RuntimeError):
    """The out dir is in use or would be overwritten."""


@dataclass
class TrainConfig:
    """Hyper-parameters (params.yaml `train`). Defaults: the paper's recipe."""
    preset: str = "paper"
    pretrained: bool | str = False   # True: ImageNet ConvNeXtV2-base from the hub; or a path
    dims: tuple[int, ...] | None = None     # override the preset's widths (tiny test models)
    depths: tuple[int, ...] | None = None
    img_size: int = 224
    epochs: int = 100
    batch_size: int = 32             # per process
    peak_lr: float = 0.01
    warmup_epochs: int = 5
    warmup_lr: float = 1e-5
    min_lr: float = 1e-6
    momentum: float = 0.9
    weight_decay: float = 2e-5
    mixup_alpha: float = 0.4         # 0 disables mixup
    ema_decay: float = 0.9999
    ema_warmup: bool = True          # timm's decay warm-up: short runs still get a useful EMA
    class_weighted_loss: bool = True
    weighted_sampler: bool = True
    augment: bool = True
    grad_clip: float = 0.0           # 0 disables clipping
    drop_path_rate: float = 0.1
    num_workers: int = 4
    seed: int = 0
    compile: bool = False
    gpu_resident: str = "auto"       # auto | on | off
    gpu_resident_max_share: float = 0.5

    @classmethod
    def resolve(cls, config_file: str | os.PathLike | None = None, **overrides) -> "TrainConfig":
        """Defaults <- the file's `train` section <- overrides that are not None."""
        values = {}
        if config_file is not None:
            values = (yaml.safe_load(Path(config_file).read_text()) or {}).get("train") or {}
        values |= {k: v for k, v in overrides.items() if v is not None}
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(values) - known):
            source = config_file or "arguments"
            raise ValueError(f"unknown train settings {unknown} (from {source})")
        for key in ("dims", "depths"):
            if values.get(key) is not None:
                values[key] = tuple(int(v) for v in values[key])
        return cls(**values)

    def for_overfit(self) -> "TrainConfig":
        """Memorise a few images: no augmentation, mixup, drop path, sampler or weight decay."""
        return dataclasses.replace(self, augment=False, mixup_alpha=0.0, drop_path_rate=0.0,
                                   weighted_sampler=False, weight_decay=0.0)


def run(train_csv: str | os.PathLike, img_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
        val_csv: str | os.PathLike | None = None, test_csv: str | os.PathLike | None = None,
        class_weights: str | os.PathLike | None = None, config: TrainConfig | None = None,
        resume: str | os.PathLike | None = None, overfit_n: int | None = None,
        mlflow: bool = True, experiment: str = tracking.DEFAULT_EXPERIMENT,
        stop_after_epoch: int | None = None, resume_fallback: bool = False) -> dict:
    """Train; returns the training summary (also written to out_dir/training_summary.json).

    overfit_n: train and validate on the same first n training images (a sanity check).
    stop_after_epoch: end this invocation after that many epochs, as a preemption would;
        `resume` continues exactly where it stopped.
    resume_fallback: when `resume` is unreadable, continue from checkpoint_prev.pt beside it
        (with a warning) instead of refusing.
    """
    cfg = config or TrainConfig()
    out_dir = Path(out_dir)
    if overfit_n:
        cfg, val_csv = cfg.for_overfit(), None
    rt = init_runtime()
    _seed_everything(cfg.seed)  # the same initial weights on every rank
    started = time.time()

    with contextlib.ExitStack() as stack:
        # Rank 0 checks the out dir, the lock, the checkpoint and MLflow; every rank learns
        # the outcome, so a refusal stops them all instead of leaving them waiting.
        ckpt, run_ = _collective(
            rt, lambda: _preflight(stack, out_dir, resume, mlflow, experiment, resume_fallback))
        if resume is not None and not rt.is_main:  # every rank restores weights and optimiser
            ckpt, _ = checkpoint.load_for_resume(resume, resume_fallback)
        train_frame = read_split(train_csv)
        if overfit_n:
            train_frame = train_frame.iloc[:overfit_n]
        val_frame = train_frame if overfit_n else (read_split(val_csv) if val_csv else None)
        weights = _class_weights(class_weights, train_frame)
        run_config = {"train": dataclasses.asdict(cfg), "train_csv": str(train_csv),
                      "val_csv": str(val_csv), "test_csv": str(test_csv), "img_dir": str(img_dir),
                      "class_weights": str(class_weights), "overfit_n": overfit_n,
                      "world_size": rt.world_size}

        train_set = SplitDataset(train_frame, img_dir)
        val_set = SplitDataset(val_frame, img_dir) if val_frame is not None else None
        n_resident = len(train_set) + (len(val_set) if val_set else 0)
        resident = choose_resident(cfg.gpu_resident, n_resident, cfg.img_size, rt.device,
                                   cfg.gpu_resident_max_share)
        sampler = make_sampler(train_set.targets, weights if cfg.weighted_sampler else None,
                               seed=cfg.seed, num_replicas=rt.world_size, rank=rt.rank)
        common = dict(resident=resident, img_size=cfg.img_size, batch_size=cfg.batch_size,
                      device=rt.device, num_workers=cfg.num_workers)
        train_input = make_input(train_set, augment=cfg.augment, sampler=sampler, drop_last=True,
                                 seed=cfg.seed + rt.rank, **common)
        val_input = (make_input(val_set, augment=False, **common)
                     if val_set is not None and rt.is_main else None)

        trainer = Trainer(cfg, rt, train_input, val_input,
                          weights if cfg.class_weighted_loss else None, run_, out_dir, run_config)
        if ckpt is not None:
            trainer.restore(ckpt)  # rank 0's generators too
        if not rt.is_main:  # other ranks draw their own augmentations from here
            _seed_everything(epoch_seed(cfg.seed + rt.rank, trainer.state.epoch))
        if ckpt is None and rt.is_main:
            _log_run_start(run_, cfg, run_config, rt, img_dir, train_csv, val_csv, train_frame,
                           val_frame)
        _print_start(rt, cfg, resident, len(train_set), len(val_set) if val_set else 0, trainer)

        state = trainer.fit(stop_after_epoch)
        summary = None
        if rt.is_main:
            summary = _finish(trainer, state, run_, out_dir, test_csv, img_dir, common, started,
                              resident)
    if summary is not None and run_.failure != summary["tracking_error"]:  # failed at the end
        summary["tracking_error"] = run_.failure
        atomic.write_json(out_dir / SUMMARY, summary)
    if rt.world_size > 1:
        dist.destroy_process_group()
    return summary


# -- before training --------------------------------------------------------------------------
def _preflight(stack: contextlib.ExitStack, out_dir: Path, resume, use_mlflow: bool,
               experiment: str, resume_fallback: bool = False):
    """Refuse a clobbering or concurrent run; load the checkpoint; open the MLflow run."""
    if resume is None and (out_dir / LAST).exists():
        raise TrainingRefused(f"{out_dir} already holds {LAST}: pass --resume {out_dir / LAST} to "
                         f"continue it, or choose another --out_dir")
    stack.enter_context(_exclusive(out_dir))
    for stale in [*out_dir.glob(".*.tmp"), *out_dir.glob(".*.link")]:
        stale.unlink()  # writes a killed run never committed (atomic.py); ours is the lock now
    ckpt = checkpoint.load_for_resume(resume, resume_fallback)[0] if resume is not None else None
    run_ = tracking.Run()
    if use_mlflow:
        uri = tracking.tracking_uri()
        tracking.check_reachable(uri)
        run_id = ckpt.get("mlflow_run_id") if ckpt else None
        run_ = stack.enter_context(tracking.Run.open(uri, run_id, experiment))
    return ckpt, run_


@contextlib.contextmanager
def _exclusive(out_dir: Path):
    """Hold out_dir/.train.lock for the whole run; a second training into it refuses.

    flock, not a mere file: the kernel releases it when the holder dies, so a killed run
    never leaves a stale lock behind.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            raise TrainingRefused(f"{out_dir} is in use by another training ({holder}); wait "
                                  f"for it or choose another --out_dir") from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield


def _collective(rt: Runtime, fn):
    """Run fn on rank 0 only; other ranks get (None, a silent Run), or fail as rank 0 did."""
    result, error = (None, tracking.Run()), None
    if rt.is_main:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = err
    if rt.world_size > 1:
        box = [error is not None and str(error)]
        dist.broadcast_object_list(box, src=0)
        if box[0] and error is None:
            raise TrainingRefused(f"rank 0 stopped: {box[0]}")
    if error is not None:
        raise error
    return result


def _class_weights(path, frame: pd.DataFrame) -> torch.Tensor:
    """Loss / sampler weights per class: the class_weights step's JSON, else inverse
    frequency ("balanced") over the training split, 0 for a class it lacks."""
    if path is not None:
        data = json.loads(Path(path).read_text())
        if list(data["classes"]) != list(CLASSES):
            raise ValueError(f"{path}: classes {data['classes']} are not {list(CLASSES)}")
        return torch.tensor(data["weights"], dtype=torch.float32)
    labels = frame["label"].to_numpy()
    present = np.unique(labels)
    weights = np.zeros(len(CLASSES), dtype=np.float32)
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return torch.from_numpy(weights)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _split_report(train_csv) -> dict:
    """The split step's report beside the train CSV (mode, split_hash), when there is one."""
    path = Path(train_csv).parent / "split_report.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def run_name(cfg: TrainConfig, split_mode: str) -> str:
    """What tells runs apart at a glance in `skinlesion runs` and the MLflow UI."""
    size = "" if cfg.img_size == 224 else f"-i{cfg.img_size}"
    return f"{cfg.preset}-{split_mode}-e{cfg.epochs}-s{cfg.seed}{size}"


def _log_run_start(run_, cfg, run_config, rt, img_dir, train_csv, val_csv, train_frame,
                   val_frame):
    digest = tracking.data_hash(img_dir, [p for p in (train_csv, val_csv) if p])
    split = _split_report(train_csv)
    split_mode = split.get("mode", "unknown")
    run_.log_params(run_config)
    run_.set_tags({"mlflow.runName": run_name(cfg, split_mode), "split_mode": split_mode,
                   "split_hash": split.get("split_hash", "unknown"),
                   "git_commit": tracking.git_commit(), "data_hash": digest,
                   "device": _device_name(rt), "world_size": str(rt.world_size)})
    frames = {"training": (train_frame, train_csv)}
    if val_frame is not None and val_csv:
        frames["validation"] = (val_frame, val_csv)
    run_.log_datasets(frames, digest)


def _device_name(rt: Runtime) -> str:
    if rt.device.type == "cuda":
        return torch.cuda.get_device_name(rt.device)
    return f"cpu ({os.cpu_count()} cores)"


def _print_start(rt, cfg, resident, n_train, n_val, trainer) -> None:
    if rt.is_main:
        path = "GPU-resident" if resident else f"DataLoader ({cfg.num_workers} workers)"
        print(f"training on {_device_name(rt)} x{rt.world_size}: {n_train} train / {n_val} val "
              f"images, {trainer.steps_per_epoch} steps/epoch, input {path}, "
              f"from epoch {trainer.state.epoch}", flush=True)


# -- after training (rank 0) ------------------------------------------------------------------
def _finish(trainer: Trainer, state, run_, out_dir: Path, test_csv, img_dir, common: dict,
            started: float, resident: bool) -> dict:
    """Save the EMA weights, test them, log the model, write training_summary.json."""
    cfg = trainer.cfg
    completed = state.epoch >= cfg.epochs
    paths = {"checkpoint_last": str(out_dir / LAST),
             "checkpoint_best": str(out_dir / BEST) if state.best else None}
    test = None
    if completed:
        paths["ema_weights"] = str(trainer.save_ema_weights())
        if test_csv:
            test_input = make_input(SplitDataset.from_csv(test_csv, img_dir), augment=False,
                                    **common)
            test = trainer.validate(trainer.ema.module, "test_ema", test_input)
            run_.log_metrics(test, step=state.epoch)
        # Logged from the saved file: a clean fp32 CPU copy, and a check that the file loads.
        model, _ = checkpoint.load_model(paths["ema_weights"])
        paths["mlflow_model_uri"] = run_.log_model(model, cfg.img_size, len(CLASSES))
    summary = {
        "completed": completed, "epochs": state.epoch, "steps": state.step,
        "best_epoch": state.best["epoch"] if state.best else None,
        "best": state.best, "final": state.history[-1] if state.history else None,
        "test": test, "mlflow_run_id": run_.run_id,
        "tracking_uri": tracking.redact(tracking.tracking_uri()) if run_.active else None,
        "tracking_error": run_.failure,
        "input_path": "gpu-resident" if resident else "dataloader",
        "seconds": round(time.time() - started, 1), "paths": paths,
    }
    atomic.write_json(out_dir / SUMMARY, summary)
    print(f"done: {state.epoch} epochs, best {state.best}, test {test}; summary in "
          f"{out_dir / SUMMARY}", flush=True)
    return summary


# -- command line -----------------------------------------------------------------------------
def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _pretrained(text: str) -> bool | str:
    return {"true": True, "false": False}.get(text.lower(), text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m components.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("data and outputs")
    io.add_argument("--train_csv", required=True)
    io.add_argument("--val_csv")
    io.add_argument("--test_csv", help="evaluate the final EMA model on it")
    io.add_argument("--img_dir", required=True)
    io.add_argument("--class_weights", help="JSON from the class_weights step (default: "
                    "inverse frequency over --train_csv)")
    io.add_argument("--out_dir", default="outputs/train")
    io.add_argument("--resume", help="checkpoint to continue (and its MLflow run)")
    io.add_argument("--resume_fallback", action="store_true",
                    help="if the --resume file is unreadable, continue from checkpoint_prev.pt")
    io.add_argument("--config", help="YAML whose `train` section sets the defaults (params.yaml)")
    io.add_argument("--no-mlflow", dest="mlflow", action="store_false")
    io.add_argument("--experiment", default=tracking.DEFAULT_EXPERIMENT,
                    help="MLflow experiment (MLFLOW_EXPERIMENT_NAME wins)")
    dev = p.add_argument_group("sanity checks")
    dev.add_argument("--overfit_mode", action="store_true",
                     help="train and validate on the same --overfit_n training images")
    dev.add_argument("--overfit_n", type=int, default=32)
    dev.add_argument("--stop_after_epoch", type=int,
                     help="stop after this many epochs (as a preemption would); --resume goes on")

    hp = p.add_argument_group("hyper-parameters (override --config; defaults: the paper's)")
    flag = argparse.BooleanOptionalAction
    for name, kind in (("epochs", int), ("batch_size", int), ("peak_lr", float),
                       ("warmup_epochs", int), ("warmup_lr", float), ("min_lr", float),
                       ("momentum", float), ("weight_decay", float), ("mixup_alpha", float),
                       ("ema_decay", float), ("grad_clip", float), ("drop_path_rate", float),
                       ("num_workers", int), ("seed", int), ("img_size", int), ("preset", str),
                       ("gpu_resident_max_share", float)):
        hp.add_argument(f"--{name}", type=kind)
    hp.add_argument("--pretrained", type=_pretrained, nargs="?", const=True,
                    help="ImageNet ConvNeXtV2-base weights: from the hub, or a file path")
    hp.add_argument("--dims", type=_ints, help="stage widths, e.g. 16,32,48,64")
    hp.add_argument("--depths", type=_ints, help="stage depths, e.g. 1,1,1,1")
    hp.add_argument("--gpu_resident", choices=("auto", "on", "off"))
    for name in ("compile", "ema_warmup", "class_weighted_loss", "weighted_sampler", "augment"):
        hp.add_argument(f"--{name}", action=flag, default=None)
    return p


HP_FLAGS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = TrainConfig.resolve(args.config, **{k: getattr(args, k) for k in HP_FLAGS})
    try:
        summary = run(args.train_csv, args.img_dir, args.out_dir, val_csv=args.val_csv,
            test_csv=args.test_csv, class_weights=args.class_weights, config=cfg,
            resume=args.resume, overfit_n=args.overfit_n if args.overfit_mode else None,
            mlflow=args.mlflow, experiment=args.experiment,
            stop_after_epoch=args.stop_after_epoch, resume_fallback=args.resume_fallback)
    except (checkpoint.CheckpointError, tracking.TrackingUnreachable, TrainingRefused,
            LabelError, FileNotFoundError) as err:
        print(f"train: {err}", file=sys.stderr)
        return 1
    if summary and summary.get("tracking_error"):
        print(f"train: {summary['tracking_error']}. Training ran to epoch {summary['epochs']} and "
              f"its checkpoints are in {args.out_dir}, but MLflow run {summary['mlflow_run_id']} "
              f"is incomplete", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
