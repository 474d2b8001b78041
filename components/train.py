"""Train the hybrid ConvNeXtV2 classifier: `python -m components.train` (or `skinlesion train`).

Settings: TrainConfig's defaults (= params.yaml's `train` section), then `--params` files,
then the flags. Writes into --out_dir: checkpoint_last.pt every epoch, checkpoint_best.pt on a
better validation balanced accuracy of the EMA weights, ema_weights.pt and
training_summary.json at the end. Logs one MLflow run (training/run_record.py) holding the
serving model; `--no_mlflow` imports no mlflow at all.

    python -m components.train --train_csv data/splits/train.csv --val_csv data/splits/val.csv \\
        --img_dir data/prepared/images --class_weights data/class_weights.json \\
        --out_dir outputs/train

Under `torchrun --nproc_per_node N -m components.train ...` it trains with DDP; only rank 0
validates, checkpoints and logs.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings
from pathlib import Path

import torch.distributed as dist

from components.common import atomic, cli_args, outputs, tracking
from components.common.config import ConfigError, TrainConfig, load_params
from components.common.labels import CLASSES, LabelError, sources
from components.evaluation.decisions import fit_model
from components.training import checkpoint, run_record, self_supervised
from components.training.balance import class_balance
from components.training.dataset import SplitDataset, read_split
from components.training.batches import choose_resident, make_input
from components.training.transforms import Augmentation
from components.training.losses import SoftTargetCrossEntropy
from components.training.out_dir import (TrainingRefused, auto_resume, exclusive,
                                         refuse_clobbering, settings_fingerprint)
from components.training.samplers import make_sampler, seed_everything
from components.training.trainer import NonFiniteLoss, Runtime, Trainer, init_runtime
from components.training.training_data import TrainingData, UnreadableInput

__all__ = ["TrainConfig", "TrainingData", "TrainingRefused", "run", "main"]


def run(data: TrainingData, out, *, config: TrainConfig | None = None, resume=None,
        overfit_n: int | None = None, use_mlflow: bool = True,
        experiment: str = tracking.DEFAULT_EXPERIMENT, stop_after_epoch: int | None = None,
        resume_fallback: bool = False) -> dict:
    """Train on `data` into the folder `out`; returns the training summary (also written to
    out/training_summary.json).

    overfit_n: train and validate on the same first n training images (a sanity check).
    stop_after_epoch: end this invocation after that many epochs, as a preemption would;
        `resume` continues exactly where it stopped.
    resume_fallback: when `resume` is unreadable, continue from checkpoint_prev.pt beside it
        (with a warning) instead of refusing.
    """
    cfg = config or TrainConfig()
    out_dir = Path(out)
    if overfit_n:
        cfg = cfg.for_overfit()
        data = data.without_validation() if data.val_csv else data
    rt = init_runtime()
    fingerprint = settings_fingerprint(cfg, rt.world_size, data.input_digest, overfit_n)
    seed_everything(cfg.seed)  # the same initial weights on every rank
    started = time.time()

    with contextlib.ExitStack() as stack:
        # Rank 0 takes the lock, then checks the out dir, resolves --resume auto, loads the
        # checkpoint and opens MLflow; every rank learns the outcome and the file resumed, so
        # a refusal stops them all instead of leaving them waiting.
        ckpt, run_, resume = _collective(rt, lambda: _preflight(
            stack, out_dir, resume, fingerprint, use_mlflow, experiment, resume_fallback))
        if resume is not None and not rt.is_main:  # every rank restores weights and optimiser
            ckpt = checkpoint.load(resume)
        train_frame = read_split(data.train_csv)
        if overfit_n:
            train_frame = train_frame.iloc[:overfit_n]
        val_frame = train_frame if overfit_n else (read_split(data.val_csv) if data.val_csv
                                                   else None)
        weights, priors = class_balance(data.class_weights, train_frame)
        run_config = {"train": cfg.as_dict(), **data.params(), "overfit_n": overfit_n,
                      "world_size": rt.world_size, "fingerprint": fingerprint}
        if cfg.warm_start and ckpt is None:  # a resumed run has its weights
            run_config["warm_start"] = str(self_supervised.pretrain(
                train_frame, data.img_dir, out_dir, cfg, fingerprint, rt))
        elif cfg.self_supervised_epochs and ckpt is None and rt.is_main:
            print(f"train: pretrained weights given ({cfg.pretrained}): no self-supervised warm "
                  "start", flush=True)

        train_input, val_input, common = _batches(cfg, rt, train_frame, val_frame,
                                                  data.img_dir, weights)
        criterion = SoftTargetCrossEntropy(
            weights if cfg.class_weighted_loss else None,
            priors.log() if cfg.logit_adjust_tau else None, cfg.logit_adjust_tau)
        trainer = Trainer(cfg, rt, train_input, val_input, criterion, run_, out_dir, run_config,
                          lineage=data.lineage, pretrained=run_config.get("warm_start"))
        if ckpt is not None:
            trainer.restore(ckpt)  # rank 0's generators too; other ranks reseed every epoch
            if rt.is_main:
                trainer.restore_best_link(resume)
        if ckpt is None and rt.is_main:
            frames = {"training": (train_frame, data.train_csv)}
            if val_frame is not None and data.val_csv:
                frames["validation"] = (val_frame, data.val_csv)
            run_record.log_start(run_, cfg, run_config, rt.device, rt.world_size, data, frames)
        _print_start(rt, cfg, common["resident"], len(train_frame),
                     len(val_frame) if val_frame is not None else 0, trainer)

        state = trainer.fit(stop_after_epoch)
        summary = None
        if rt.is_main:
            summary = _finish(trainer, state, run_, out_dir, data, common, started)
    if summary is not None and run_.failure != summary["tracking_error"]:  # failed at the end
        summary["tracking_error"] = run_.failure
        atomic.write_json(out_dir / outputs.TRAINING_SUMMARY, summary)
    if rt.world_size > 1:
        dist.destroy_process_group()
    return summary


# -- before training --------------------------------------------------------------------------
AUTO = "auto"


def _preflight(stack: contextlib.ExitStack, out_dir: Path, resume, fingerprint: str,
               use_mlflow: bool, experiment: str, resume_fallback: bool = False):
    """Hold the out dir before reading or moving anything in it, refuse a clobbering run,
    resolve `--resume auto`, load the checkpoint, open the MLflow run. Returns (checkpoint,
    run, the checkpoint file resumed)."""
    stack.enter_context(exclusive(out_dir))
    refuse_clobbering(out_dir, resume)
    uri = tracking.tracking_uri() if use_mlflow else None
    if uri is not None:
        tracking.check_reachable(uri)  # before anything is moved aside
    ckpt = None
    if resume == AUTO:
        ckpt, resume = auto_resume(out_dir, fingerprint)
    elif resume is not None:
        ckpt, resume = checkpoint.load_for_resume(resume, resume_fallback)
    run_ = tracking.Run()
    if uri is not None:
        run_id = ckpt.get("mlflow_run_id") if ckpt else None
        run_ = stack.enter_context(tracking.Run.open(uri, run_id, experiment))
    return ckpt, run_, resume


def _batches(cfg: TrainConfig, rt: Runtime, train_frame, val_frame, img_dir, weights):
    """(train input, val input or None, the settings both share): the device-resident path
    when the images fit (or are asked to), else the DataLoader; the sampler per the recipe."""
    train_set = SplitDataset(train_frame, img_dir)
    val_set = SplitDataset(val_frame, img_dir) if val_frame is not None else None
    n_resident = len(train_set) + (len(val_set) if val_set else 0)
    resident = choose_resident(cfg.gpu_resident, n_resident, cfg.img_size, rt.device,
                               cfg.gpu_resident_max_share)
    sites = sources(train_frame) if cfg.sampler_balance == "class_site" else None
    if sites is not None and sites.nunique() < 2:
        warnings.warn(f"sampler_balance class_site: the training split names one site only "
                      f"({sites.iloc[0]}; a `source` column or lesion-id prefixes name them): "
                      "the sampler balances the classes alone")
    sampler = make_sampler(train_set.targets, weights if cfg.weighted_sampler else None,
                           seed=cfg.seed, num_replicas=rt.world_size, rank=rt.rank,
                           defer_epochs=cfg.defer_sampler_epochs, sites=sites)
    common = dict(resident=resident, img_size=cfg.img_size, batch_size=cfg.batch_size,
                  device=rt.device, num_workers=cfg.loader_workers())
    train_input = make_input(train_set, augment=cfg.augment, sampler=sampler, drop_last=True,
                             seed=cfg.seed + rt.rank, augmentation=Augmentation.from_config(cfg),
                             **common)
    val_input = (make_input(val_set, augment=False, **common)
                 if val_set is not None and rt.is_main else None)
    return train_input, val_input, common


def _collective(rt: Runtime, fn):
    """Run fn (-> checkpoint, run, checkpoint file) on rank 0 only; other ranks get (None, a
    silent Run, the same file), or fail as rank 0 did."""
    result, error = (None, tracking.Run(), None), None
    if rt.is_main:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = err
    if rt.world_size > 1:
        box = [error is not None and str(error), result[2]]
        dist.broadcast_object_list(box, src=0)
        if box[0] and error is None:
            raise TrainingRefused(f"rank 0 stopped: {box[0]}")
        result = (*result[:2], box[1])
    if error is not None:
        raise error
    return result


def _print_start(rt, cfg, resident, n_train, n_val, trainer) -> None:
    if rt.is_main:
        path = "GPU-resident" if resident else f"DataLoader ({cfg.loader_workers()} workers)"
        print(f"training on {run_record.device_name(rt.device)} x{rt.world_size}: {n_train} "
              f"train / {n_val} val images, {trainer.steps_per_epoch} steps/epoch, input {path}, "
              f"from epoch {trainer.state.epoch}", flush=True)


# -- after training (rank 0) ------------------------------------------------------------------
def _finish(trainer: Trainer, state, run_, out_dir: Path, data: TrainingData, common: dict,
            started: float) -> dict:
    """Save the EMA weights, test them, log the served model, write training_summary.json."""
    completed = state.epoch >= trainer.cfg.epochs
    paths = {"checkpoint_last": str(out_dir / outputs.CHECKPOINT_LAST),
             "checkpoint_best": str(out_dir / outputs.CHECKPOINT_BEST) if state.best else None}
    test = None
    if completed:
        paths["ema_weights"] = str(trainer.save_ema_weights())
        if trainer.val_input is not None:  # thresholds and temperature for these weights
            paths["calibration"] = str(fit_calibration(trainer, out_dir, data, common))
        if data.test_csv:
            test_input = make_input(SplitDataset.from_csv(data.test_csv, data.img_dir),
                                    augment=False, **common)
            test = trainer.validate(trainer.ema.module, "test_ema", test_input)
            run_.log_metrics(test, step=state.epoch)
        paths["mlflow_model_uri"] = log_served_model(run_, paths["ema_weights"])
    summary = {
        "completed": completed, "epochs": state.epoch, "steps": state.step,
        "best_epoch": state.best["epoch"] if state.best else None,
        "best": state.best, "final": state.history[-1] if state.history else None,
        "test": test, "mlflow_run_id": run_.run_id,
        "tracking_uri": tracking.redact(tracking.tracking_uri()) if run_.active else None,
        "tracking_error": run_.failure, "split_hash": data.lineage.get("split_hash"),
        "input_path": "gpu-resident" if common["resident"] else "dataloader",
        "seconds": round(time.time() - started, 1), "paths": paths,
    }
    atomic.write_json(out_dir / outputs.TRAINING_SUMMARY, summary)
    print(f"done: {state.epoch} epochs, best {state.best}"
          f"{'' if test is None else f', test {test}'}; summary in "
          f"{out_dir / outputs.TRAINING_SUMMARY}", flush=True)
    return summary


# -- command line -----------------------------------------------------------------------------
def build_parser() -> cli_args.ArgumentParser:
    p = cli_args.ArgumentParser(prog="python -m components.train", description=__doc__)
    io = p.add_argument_group("data and outputs")
    io.add_argument("--train_csv", required=True)
    io.add_argument("--val_csv")
    io.add_argument("--test_csv", help="evaluate the final EMA model on it")
    io.add_argument("--img_dir", required=True)
    io.add_argument("--class_weights", help="JSON from the class_weights step (default: "
                    "inverse frequency over --train_csv)")
    io.add_argument("--out_dir", default="outputs/train")
    io.add_argument("--resume", help="checkpoint to continue (and its MLflow run); `auto`: "
                    "continue --out_dir's checkpoint when it was made with the same recipe and "
                    "inputs, else move its run to --out_dir/superseded-<UTC time>/ and start "
                    "over (the DVC stage uses this)")
    io.add_argument("--resume_fallback", action="store_true",
                    help="if the --resume file is unreadable, continue from checkpoint_prev.pt")
    cli_args.add_params_flags(io)
    io.add_argument("--no_mlflow", dest="mlflow", action="store_false",
                    help="log nothing and import no mlflow")
    io.add_argument("--experiment", default=tracking.DEFAULT_EXPERIMENT,
                    help="MLflow experiment (MLFLOW_EXPERIMENT_NAME wins)")
    scale = p.add_argument_group(
        "scale-out (nodes x gpus_per_node > 1: under torchrun, or `skinlesion pipeline train-job`)")
    scale.add_argument("--nodes", type=int, help="nodes (pods) of the TrainJob")
    scale.add_argument("--gpus_per_node", type=int, help="GPUs (DDP processes) per node")
    dev = p.add_argument_group("sanity checks")
    dev.add_argument("--overfit_mode", action="store_true",
                     help="train and validate on the same --overfit_n training images")
    dev.add_argument("--overfit_n", type=int, default=32)
    dev.add_argument("--stop_after_epoch", type=int,
                     help="stop after this many epochs (as a preemption would); --resume goes on")

    cli_args.add_config_flags(
        p.add_argument_group("settings (override --params; defaults: params.yaml's train)"),
        TrainConfig)
    return p


def settings(args: argparse.Namespace) -> tuple[list, dict, TrainConfig]:
    """(params files, the params read from them, the TrainConfig) of parsed flags."""
    params_files = cli_args.params_paths(args)
    params = load_params(params_files)  # read first: an edit meanwhile is seen at the end
    cfg = TrainConfig.resolve(params, source=", ".join(map(str, params_files)) or None,
                              **cli_args.config_flags(args, TrainConfig))
    return params_files, params, cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params_files, params, cfg = settings(args)
        if cfg.world_size > 1 and "WORLD_SIZE" not in os.environ:  # not yet under torchrun
            raise ConfigError(f"train.nodes x train.gpus_per_node = {cfg.world_size}: run it on "
                              f"a cluster with `skinlesion pipeline train-job --image IMAGE --pvc "
                              f"PVC <these flags>`, or on one machine with `torchrun "
                              f"--nproc-per-node {cfg.gpus_per_node} -m components.train ...`")
        data = TrainingData.read(args.train_csv, args.img_dir, val_csv=args.val_csv,
                                 test_csv=args.test_csv, class_weights=args.class_weights)
        summary = run(data, args.out_dir, config=cfg, resume=args.resume,
                      overfit_n=args.overfit_n if args.overfit_mode else None,
                      use_mlflow=args.mlflow, experiment=args.experiment,
                      stop_after_epoch=args.stop_after_epoch,
                      resume_fallback=args.resume_fallback)
        check_params_unchanged(params_files, params)
    except (checkpoint.CheckpointError, tracking.TrackingUnreachable, TrainingRefused,
            LabelError, ConfigError, NonFiniteLoss, UnreadableInput) as err:
        print(f"train: {tracking.scrub(str(err))}", file=sys.stderr)
        return 1
    except OSError as err:  # a missing input, a read-only or full output folder
        print(f"train: {tracking.scrub(cli_args.os_error(err))}", file=sys.stderr)
        return 1
    if summary and summary.get("tracking_error"):
        print(f"train: {summary['tracking_error']}. Training ran to epoch {summary['epochs']} and "
              f"its checkpoints are in {args.out_dir}, but MLflow run {summary['mlflow_run_id']} "
              f"is incomplete", file=sys.stderr)
        return 1
    return 0


def check_params_unchanged(paths: list, started_with: dict) -> None:
    """A ConfigError naming the keys of the params files' train section that differ from what
    the training started with: `dvc repro` records the files as they are at the stage's end,
    and must not record values the training did not use."""
    section = TrainConfig.SECTION
    before, now = started_with.get(section) or {}, load_params(paths).get(section) or {}
    changed = [f"{section}.{key} ({before.get(key)!r} -> {now.get(key)!r})"
               for key in sorted(before.keys() | now.keys(), key=str)
               if before.get(key) != now.get(key)]
    if changed:
        raise ConfigError(f"{', '.join(map(str, paths))} changed while this training ran: "
                          f"{', '.join(changed)}. The training used the values it started with "
                          f"(its checkpoints are kept); run it again to train with the new ones")


def fit_calibration(trainer: Trainer, out_dir: Path, data: TrainingData, common: dict) -> Path:
    """calibration.json of the final EMA weights: thresholds fitted on the validation input,
    OOD statistics on the training split without augmentation."""
    model = trainer.ema.module
    path = out_dir / outputs.CALIBRATION
    # from disk: a second device-resident copy of the training images could exhaust the GPU
    train_input = make_input(SplitDataset.from_csv(data.train_csv, data.img_dir),
                             augment=False, **{**common, "resident": False})
    fit_model(model, trainer.val_input.epoch(), train_input.epoch(), list(CLASSES),
              checkpoint.weights_digest(model.state_dict()), path, source="validation split")
    return path


def log_served_model(run_, ema_weights) -> str | None:
    """Log the serving model (registry/pyfunc.py) of the saved EMA weights into the run; the
    register step reuses it. Returns its models:/ URI (None without a run or on failure)."""
    if run_.run_id is None:
        return None
    from components.registry import pyfunc  # mlflow: only with a run

    model, meta = checkpoint.load_model(ema_weights)  # from the file: a check that it loads
    meta["weights_digest"] = checkpoint.weights_digest(model.state_dict())
    logged = run_.call("logging the model", pyfunc.log_model, run_.run_id, model.state_dict(),
                       meta, Path(ema_weights).parent / outputs.CALIBRATION)
    return logged[0] if logged else None


if __name__ == "__main__":
    sys.exit(main())
