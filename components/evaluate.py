"""evaluate step: score a trained model on the test split.

    python -m components.evaluate --model PATH_OR_MLFLOW_URI --test_csv CSV --img_dir DIR \
        --out DIR [--tta] [--no-mlflow]

`--model` is a training checkpoint, `ema_weights.pt`, a training output folder, or an MLflow
model URI (`runs:/<id>/model`, `models:/<name>@<alias>`). A checkpoint holding both EMA and
raw weights is scored twice: the EMA weights (the registered model) fill OUT, the raw ones
OUT/raw and the `raw` key of OUT/metrics.json.

Output (every file written atomically; OUT/raw/ has the same files except metrics.json):

    metrics.json          headline metrics, ci95 intervals, roc_auc_per_class, confusion matrix
    per_class.csv         class,precision,recall,f1,auc,support
    predictions.csv       image,true,predicted,prob_MEL,...,prob_SCC
    roc.csv               fpr and one TPR column per class on a common grid (DVC plot)
    reliability.csv       non-empty confidence bins: lower,upper,confidence,accuracy,count
    confusion_matrix.png, confusion_matrix_normalized.png, roc.png, reliability.png
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
import yaml
from mlflow.exceptions import MlflowException
from torch import nn
from torch.utils.data import DataLoader

from . import atomic, checkpoint, plots, tracking
from .dataset import SplitDataset, read_split
from .labels import CLASSES
from .metrics import (HEADLINE, bootstrap_intervals, classification_metrics, kfp_metrics,
                      reliability_bins, roc_points)
from .transforms import eval_transform

log = logging.getLogger(__name__)

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
# Files tried, in order, when --model is a training output folder: the last checkpoint holds
# the raw weights and the EMA weights that ema_weights.pt (the registered model) ships.
CHECKPOINT_NAMES = ("checkpoint_last.pt", "ema_weights.pt")
TRAINING_SUMMARY = "training_summary.json"
# Checkpoint key -> name of the evaluation; the first one present is the headline model.
VARIANTS = {"ema": "ema", "model": "raw"}
DEFAULT_IMG_SIZE = 224


def run(model: str | os.PathLike, test_csv: str | os.PathLike, img_dir: str | os.PathLike,
        out: str | os.PathLike, *, tta: bool = False, batch_size: int = 64,
        bootstrap: int = 1000, seed: int = 0, device: str | None = None, num_workers: int = 0,
        use_mlflow: bool = True, img_size: int | None = None) -> dict:
    """Predict the test split, write metrics, tables and figures to `out`, log them to MLflow.

    Returns the headline model's metrics (HEADLINE and n_images), the raw model's prefixed
    `raw_`, the weights evaluated and the MLflow run logged into.
    """
    started = time.time()
    out = Path(out)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models, meta = load_models(str(model), img_size)
    frame = read_split(test_csv)
    loader = DataLoader(SplitDataset(frame, img_dir, eval_transform(meta["img_size"])),
                        batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    probs = predict(models, loader, device, tta)

    groups = frame["lesion_id"].to_numpy(dtype=object) if "lesion_id" in frame else None
    reports = {}
    for i, (name, p) in enumerate(probs.items()):
        reports[name] = report(frame, p, out if i == 0 else out / name, groups=groups,
                               n_boot=bootstrap, seed=seed)
    headline, *others = reports
    metrics = {"weights": headline, "tta": tta, **reports[headline],
               **{name: reports[name] for name in others}}
    atomic.write_json(out / "metrics.json", metrics)

    run_id = log_to_mlflow(metrics, out, meta.get("mlflow_run_id")) if use_mlflow else None
    summary = {"weights": headline, "n_images": metrics["n_images"],
               **{k: metrics[k] for k in HEADLINE if metrics[k] is not None}}
    for name in others:
        summary.update({f"{name}_{k}": v for k, v in reports[name].items()
                        if k in HEADLINE and v is not None})
    summary.update(mlflow_run_id=run_id, seconds=round(time.time() - started, 1))
    return summary


def load_models(source: str, img_size: int | None = None) -> tuple[dict[str, nn.Module], dict]:
    """{variant: model} in headline-first order, and meta (classes, img_size, mlflow_run_id)."""
    if source.startswith(MLFLOW_SCHEMES):
        return _load_mlflow_model(source, img_size)
    path = _resolve_checkpoint(Path(source))
    state = checkpoint.load(path)
    present = [key for key in VARIANTS if key in state]
    if not present:
        raise checkpoint.CheckpointError(f"{path} holds neither EMA nor raw weights")
    models, meta = {}, {}
    for key in present:
        models[VARIANTS[key]], meta = checkpoint.load_model(path, which=key)
    if tuple(meta["classes"]) != CLASSES:
        raise ValueError(f"{path}: model classes {meta['classes']} differ from {CLASSES}")
    meta["img_size"] = img_size or meta.get("img_size") or DEFAULT_IMG_SIZE
    meta["mlflow_run_id"] = state.get("mlflow_run_id") or _summary_run_id(path.parent)
    return models, meta


def _resolve_checkpoint(path: Path) -> Path:
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path} holds none of {CHECKPOINT_NAMES}")
    return path


def _summary_run_id(folder: Path) -> str | None:
    """The MLflow run of the training that wrote `folder` (ema_weights.pt does not carry it)."""
    summary = folder / TRAINING_SUMMARY
    return json.loads(summary.read_text()).get("mlflow_run_id") if summary.is_file() else None


def _load_mlflow_model(uri: str, img_size: int | None) -> tuple[dict[str, nn.Module], dict]:
    """A model logged with mlflow.pytorch; its training run supplies img_size when logged."""
    mlflow.set_tracking_uri(tracking.tracking_uri())
    run_id = _run_id_of(uri)
    params = mlflow.get_run(run_id).data.params if run_id else {}
    size = img_size or int(params.get("train.img_size") or params.get("img_size")
                           or DEFAULT_IMG_SIZE)
    model = mlflow.pytorch.load_model(uri, map_location="cpu")
    # A "pt2" model comes back as torch.export's GraphModule: eval-mode by construction, and
    # it refuses .eval(); a pickled nn.Module is switched to eval mode here.
    if not isinstance(model, torch.fx.GraphModule):
        model.eval()
    return {"model": model}, {"classes": CLASSES, "img_size": size, "mlflow_run_id": run_id}


def _run_id_of(uri: str) -> str | None:
    """The run behind `runs:/<id>/...`, a registered `models:/...` version or a logged model."""
    if uri.startswith("runs:/"):
        return uri.removeprefix("runs:/").split("/", 1)[0]
    if uri.startswith("models:/"):
        ref = uri.removeprefix("models:/")
        client = mlflow.MlflowClient()
        if "@" in ref:
            return client.get_model_version_by_alias(*ref.split("@", 1)).run_id
        if "/" in ref:
            return client.get_model_version(*ref.split("/", 1)).run_id
        return mlflow.get_logged_model(ref).source_run_id  # MLflow 3 logged model `m-<id>`
    return None


@torch.inference_mode()
def predict(models: dict[str, nn.Module], loader: DataLoader, device: torch.device,
            tta: bool = False) -> dict[str, np.ndarray]:
    """Softmax probabilities of every model over the loader (decoded once for all of them);
    bf16 autocast on CUDA, fp32 elsewhere. `tta` averages the four flips of each image."""
    for model in models.values():
        model.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" \
        else contextlib.nullcontext()
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in models}
    for images, _ in loader:
        images = images.to(device, non_blocking=True)
        views = flips(images) if tta else [images]
        for name, model in models.items():
            with autocast:
                logits = [model(v).float() for v in views]
            p = torch.stack([x.softmax(dim=1) for x in logits]).mean(dim=0)
            chunks[name].append(p.double().cpu().numpy())
    return {name: np.concatenate(c) for name, c in chunks.items()}


def flips(images: torch.Tensor) -> list[torch.Tensor]:
    """The image, its horizontal, vertical and double flip: averaging over this group makes
    the prediction the same for an image and any flip of it."""
    return [images, images.flip(-1), images.flip(-2), images.flip((-2, -1))]


def report(frame: pd.DataFrame, probs: np.ndarray, out: Path, *, groups=None,
           n_boot: int = 1000, seed: int = 0) -> dict:
    """Metrics with bootstrap intervals; tables, plot data and figures written to `out`."""
    y_true = frame["label"].to_numpy()
    m = classification_metrics(y_true, probs, CLASSES)
    per_class = m.pop("per_class")
    m["ci95"] = bootstrap_intervals(y_true, probs, groups=groups, n=n_boot, seed=seed)
    unit = "lesion" if groups is not None and pd.notna(groups).any() else "image"
    m["bootstrap"] = {"resamples": n_boot, "seed": seed, "unit": unit, "level": 0.95}

    names = np.asarray(CLASSES)
    predictions = pd.DataFrame({"image": frame["image"], "true": names[y_true],
                                "predicted": names[probs.argmax(axis=1)]})
    predictions[[f"prob_{c}" for c in CLASSES]] = probs
    _write_csv(out / "predictions.csv", predictions)
    _write_csv(out / "per_class.csv",
               pd.DataFrame.from_dict(per_class, orient="index").rename_axis("class"),
               index=True)
    _write_csv(out / "roc.csv", pd.DataFrame(roc_points(y_true, probs, CLASSES)))
    bins = reliability_bins(y_true, probs)
    table = pd.DataFrame(bins)
    _write_csv(out / "reliability.csv", table[table["count"] > 0])

    plots.plot_confusion(m["confusion_matrix"], CLASSES, out / "confusion_matrix.png")
    plots.plot_confusion(m["confusion_matrix"], CLASSES, out / "confusion_matrix_normalized.png",
                         normalize=True)
    plots.plot_roc(y_true, probs, CLASSES, out / "roc.png")
    plots.plot_reliability(bins, m["ece"], out / "reliability.png")
    return m


def _write_csv(path: Path, table: pd.DataFrame, index: bool = False) -> None:
    atomic.write_text(path, table.to_csv(index=index, float_format="%.6f"))


def kfp_outputs(out: str | os.PathLike, max_points: int = 200) -> dict:
    """What the KFP wrapper logs, from an evaluate output folder: see metrics.kfp_metrics
    ({"scalars", "confusion_matrix", "roc"}; ROC micro-averaged from predictions.csv)."""
    out = Path(out)
    metrics = json.loads((out / "metrics.json").read_text())
    predictions = pd.read_csv(out / "predictions.csv")
    y_true = predictions["true"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    probs = predictions[[f"prob_{c}" for c in CLASSES]].to_numpy()
    return kfp_metrics(metrics, y_true, probs, max_points=max_points)


def log_to_mlflow(metrics: dict, out: Path, training_run_id: str | None) -> str:
    """Log `test_`-prefixed metrics and the output files into the training run when the
    store knows it, else into a new evaluation run tagged with it; returns the run id."""
    uri = tracking.tracking_uri()
    tracking.check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    run_id = None
    if training_run_id:
        try:
            experiment_id = mlflow.get_run(training_run_id).info.experiment_id
            # start_run(run_id) refuses a run outside the process's active experiment.
            mlflow.set_experiment(experiment_id=experiment_id)
            run_id = training_run_id
        except MlflowException as err:
            log.warning("training run %s not in %s (%s): logging a new evaluation run",
                        training_run_id, tracking.redact(uri), err)
    # Tags name a separate evaluation run; logging into the training run leaves its tags alone.
    tags = None if run_id else {"skinlesion.step": "evaluate",
                                "training_run_id": training_run_id or ""}
    with tracking.start_run(uri, run_id, tracking.DEFAULT_EXPERIMENT, tags) as active:
        mlflow.log_metrics(_flat_metrics(metrics, "test_"))
        for name in VARIANTS.values():
            if isinstance(metrics.get(name), dict):
                mlflow.log_metrics(_flat_metrics(metrics[name], f"test_{name}_"))
        mlflow.set_tags({"evaluate.weights": metrics["weights"],
                         "evaluate.tta": str(metrics["tta"]).lower()})
        mlflow.log_artifacts(str(out), artifact_path="evaluation")
        return active.info.run_id


def _flat_metrics(m: dict, prefix: str) -> dict[str, float]:
    flat = {f"{prefix}{k}": m[k] for k in ("n_images", *HEADLINE) if m.get(k) is not None}
    flat.update({f"{prefix}roc_auc_{c}": v for c, v in m["roc_auc_per_class"].items()
                 if v is not None})
    for k, ci in m["ci95"].items():
        flat.update({f"{prefix}{k}_ci_{end}": ci[end] for end in ("low", "high")
                     if ci[end] is not None})
    return flat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.evaluate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="checkpoint, training output folder, or MLflow model URI")
    parser.add_argument("--test_csv", required=True)
    parser.add_argument("--img_dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params.yaml",
                        help="YAML whose `evaluate` section gives the defaults below")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average the predictions of the four flips of each image")
    parser.add_argument("--batch_size", type=int)
    parser.add_argument("--bootstrap", type=int, help="bootstrap resamples (0 disables)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--img_size", type=int, help="override the model's input size")
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--no-mlflow", dest="use_mlflow", action="store_false",
                        help="do not log to MLflow")
    args = parser.parse_args(argv)
    options = {"tta": False, "batch_size": 64, "bootstrap": 1000, "seed": 0}
    if Path(args.params).is_file():
        section = (yaml.safe_load(Path(args.params).read_text()) or {}).get("evaluate") or {}
        options.update({k: v for k, v in section.items() if k in options})
    options.update({k: getattr(args, k) for k in options if getattr(args, k) is not None})
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = run(args.model, args.test_csv, args.img_dir, args.out, img_size=args.img_size,
                  device=args.device, num_workers=args.num_workers, use_mlflow=args.use_mlflow,
                  **options)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
