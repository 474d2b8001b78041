"""evaluate step: score a trained model on the test split.

    python -m components.evaluate --model outputs/train --test_csv data/splits/test.csv \\
        --img_dir data/prepared/images --out outputs/eval [--params params.yaml] [--no_mlflow]

`--model` is a training output folder (DVC and Kubeflow both pass this), a training
checkpoint, `ema_weights.pt`, or a registered / logged model URI (`models:/NAME@ALIAS`,
`runs:/<id>/classifier`, `models:/m-<id>`). A checkpoint holding both EMA and raw weights is
scored twice: the EMA weights (the registered model) fill OUT, the raw ones OUT/raw and the
`raw` key of OUT/metrics.json. A model with NaN/inf weights or outputs is refused.

Output (every file written atomically; OUT/raw/ has the same files except metrics.json
and headline.json):

    headline.json         the DVC metric: a few headline metrics with their 95% intervals
    metrics.json          headline metrics, ci95 intervals, roc_auc_per_class, confusion matrix,
                          the melanoma-vs-rest operating point at evaluate.melanoma_specificity,
                          per_source (when the test set holds several sources: the headline
                          metrics with intervals of each), cross_site (then too: melanoma
                          ROC-AUC pooled and within each source, the gap and the site-shortcut
                          flag; evaluation/sites.py),
                          and what was scored: weights_digest, split_hash (register checks both);
                          with the model's calibration.json (fitted on validation: train writes
                          it, `skinlesion calibrate` fits one for an older run): `decisions`
                          (each decision's test sensitivity / specificity at the threshold
                          chosen on validation, lesion-level 95% intervals), `calibration`
                          (temperature; NLL, Brier, ECE before / after), `ood` (AUROC of the
                          OOD score, test split against evaluation/ood_images.py); without
                          it these are null and `decisions_reason` says why. The
                          melanoma_operating_point above is chosen on test (`chosen_on`).
    per_class.csv         class,precision,recall,f1,auc,support
    predictions.csv       image,true,predicted,prob_MEL,...,prob_SCC
    roc.csv               fpr and one TPR column per class on a common grid (DVC plot)
    reliability.csv       non-empty confidence bins: lower,upper,confidence,accuracy,count
    confusion_matrix.png, confusion_matrix_normalized.png, roc.png, reliability.png
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from components.common import atomic, cli_args, decisions, outputs, tracking
from components.common.config import ConfigError, EvaluateConfig
from components.common.images import prepare_image, resize_size
from components.common.labels import CLASSES, sources
from components.evaluation import calibration, mlflow_log, ood_images, sites
from components.evaluation.decisions import at_thresholds, ood_auroc
from components.evaluation.metrics import (HEADLINE, HEADLINE_SHOWN, bootstrap_intervals,
                                           classification_metrics, operating_point,
                                           reliability_bins, roc_points)
from components.training import checkpoint
from components.training.dataset import SplitDataset, read_split
from components.training.transforms import eval_transform

log = logging.getLogger(__name__)

try:
    from components.evaluation import plots
except ImportError:  # no matplotlib (a bare GPU box): metrics and tables, no figures
    plots = None

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
# Files tried, in order, when --model is a training output folder: the last checkpoint holds
# the raw weights and the EMA weights that ema_weights.pt (the registered model) ships.
CHECKPOINT_NAMES = (outputs.CHECKPOINT_LAST, outputs.EMA_WEIGHTS)
# Checkpoint key -> name of the evaluation; the first one present is the headline model.
VARIANTS = {"ema": "ema", "model": "raw"}
MELANOMA = CLASSES.index("MEL")


class ModelRefused(ValueError):
    """The model's weights or outputs are not finite numbers."""


def run(model: str | os.PathLike, test_csv: str | os.PathLike, img_dir: str | os.PathLike,
        out: str | os.PathLike, *, config: EvaluateConfig | None = None,
        device: str | None = None, num_workers: int = 0, use_mlflow: bool = True,
        img_size: int | None = None) -> dict:
    """Predict the test split, write metrics, tables and figures to `out`, log them to MLflow.

    Returns the headline model's metrics (HEADLINE and n_images), the raw model's prefixed
    `raw_`, the weights evaluated and the MLflow run logged into.
    """
    cfg = config or EvaluateConfig()
    started = time.time()
    out = Path(out)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models, meta = load_models(str(model), img_size)
    frame = read_split(test_csv)
    loader = DataLoader(SplitDataset(frame, img_dir, eval_transform(meta["img_size"])),
                        batch_size=cfg.batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    probs = predict(models, loader, device, cfg.tta)

    groups = frame["lesion_id"].to_numpy(dtype=object) if "lesion_id" in frame else None
    fitted = meta["fitted"]  # fitted for the headline weights only
    reports = {}
    for i, (name, p) in enumerate(probs.items()):
        reports[name] = report(frame, p, out if i == 0 else out / outputs.RAW_SUBDIR,
                               groups=groups, cfg=cfg,
                               temperature=fitted["temperature"] if fitted and i == 0 else None)
    headline, *others = reports
    reports[headline] |= validated(frame, probs[headline], fitted, meta, models[headline],
                                   loader, device, groups, cfg)
    # an image's source as split gives it: its `source` column, else its lesion id's prefix
    source = sources(frame) if {"source", "lesion_id"} & set(frame.columns) else None
    if source is not None and source.nunique() > 1:
        reports[headline]["per_source"] = per_source(frame, probs[headline], source, groups, cfg)
        reports[headline]["cross_site"] = sites.report(frame["label"], probs[headline], source,
                                                       groups, n=cfg.bootstrap, seed=cfg.seed)
    split_report = Path(test_csv).parent / outputs.SPLIT_REPORT
    metrics = {"weights": headline, "tta": cfg.tta, **reports[headline],
               "weights_digest": meta["weights_digest"],
               "split_hash": json.loads(split_report.read_text()).get("split_hash")
               if split_report.is_file() else None,
               **{name: reports[name] for name in others}}
    atomic.write_json(out / outputs.METRICS, metrics)
    atomic.write_json(out / outputs.HEADLINE_METRICS, headline_metrics(metrics))

    run_id = (mlflow_log.log_metrics(metrics, out, meta.get("mlflow_run_id"), list(VARIANTS.values()))
              if use_mlflow else None)
    summary = {"weights": headline, "n_images": metrics["n_images"],
               **{k: metrics[k] for k in HEADLINE if metrics[k] is not None}}
    for name in others:
        summary.update({f"{name}_{k}": v for k, v in reports[name].items()
                        if k in HEADLINE and v is not None})
    summary.update(mlflow_run_id=run_id, seconds=round(time.time() - started, 1))
    return summary


def validated(frame: pd.DataFrame, probs: np.ndarray, fitted: dict | None, meta: dict,
              model: nn.Module, loader: DataLoader, device: torch.device, groups,
              cfg: EvaluateConfig) -> dict:
    """The calibration file applied unchanged to test: each decision at its validated
    threshold, and the OOD score's AUROC against non-dermoscopy images."""
    if fitted is None:
        return {"decisions": None, "calibration": None, "ood": None,
                "decisions_reason": meta["fit_reason"]}
    calibrated = calibration.rescale_probs(probs, fitted["temperature"])
    test_features = calibration.collect_outputs(model, loader, device)[1]
    photos = ood_tensors(meta)
    photo_features = calibration.collect_outputs(model, [(photos, torch.zeros(len(photos)))],
                                                 device)[1]
    return {"decisions": at_thresholds(frame["label"].to_numpy(), calibrated, list(CLASSES),
                                       fitted, groups, n=cfg.bootstrap, seed=cfg.seed),
            "ood": ood_auroc(test_features, photo_features, fitted), "decisions_reason": ""}


def ood_tensors(meta: dict) -> torch.Tensor:
    """evaluation/ood_images.py's images prepared as the served model prepares a request."""
    prepare = int(meta.get("prepare_size") or resize_size(meta["img_size"]))
    transform = eval_transform(meta["img_size"])
    return torch.stack([
        transform(prepare_image(ood_images.png_bytes(image), prepare,
                                color=meta.get("color_constancy") or "none",
                                minkowski_p=float(meta.get("minkowski_p") or 6.0))[0])
        for image in ood_images.images().values()])


def headline_metrics(metrics: dict) -> dict:
    """The few numbers `dvc exp show` lists: headline test metrics with their 95% intervals
    and the melanoma operating point (metrics.json has everything else)."""
    out = {}
    for name in HEADLINE_SHOWN:
        if metrics.get(name) is None:
            continue
        ci = (metrics.get("ci95") or {}).get(name) or {}
        out |= {name: round(metrics[name], 4), f"{name}_ci_low": _round(ci.get("low")),
                f"{name}_ci_high": _round(ci.get("high"))}
    if point := metrics.get("melanoma_operating_point"):
        out["melanoma_sensitivity"] = round(point["sensitivity"], 4)
        out["melanoma_specificity"] = round(point["specificity"], 4)
    for name, d in (metrics.get("decisions") or {}).items():  # at the validation threshold
        out |= {f"{name}_{k}": _round(d[k]) for k in ("threshold", "sensitivity", "specificity")}
    if cal := metrics.get("calibration"):
        out |= {"ece_calibrated": _round(cal["after"]["ece"]),
                "nll_calibrated": _round(cal["after"]["nll"])}
    if ood := metrics.get("ood"):
        out["ood_auroc"] = _round(ood["auroc"])
    out["n_images"] = metrics.get("n_images")
    return out


def _round(value):
    return None if value is None else round(value, 4)


def load_models(source: str, img_size: int | None = None) -> tuple[dict[str, nn.Module], dict]:
    """{variant: model} in headline-first order, and meta (classes, img_size, mlflow_run_id,
    weights_digest of the headline weights)."""
    if source.startswith(MLFLOW_SCHEMES):
        return _load_registered(source, img_size)
    path = _resolve_checkpoint(Path(source))
    state = checkpoint.load(path)
    present = [key for key in VARIANTS if key in state]
    if not present:
        raise checkpoint.CheckpointError(f"{path} holds neither EMA nor raw weights")
    models, meta = {}, {}
    for key in present:
        checkpoint.check_finite(state[key], f"{path} ({key} weights)")
        models[VARIANTS[key]], meta = checkpoint.load_model(path, which=key)
    if tuple(meta["classes"]) != CLASSES:
        raise ValueError(f"{path}: model classes {meta['classes']} differ from {CLASSES}")
    meta["img_size"] = img_size or meta["img_size"]
    meta["weights_digest"] = checkpoint.weights_digest(state[present[0]])
    # the file travels beside the weights; read() refuses it for other weights
    meta["fitted"], meta["fit_reason"] = decisions.read(path.parent / outputs.CALIBRATION,
                                                        meta["weights_digest"])
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
    summary = folder / outputs.TRAINING_SUMMARY
    return json.loads(summary.read_text()).get("mlflow_run_id") if summary.is_file() else None


def _load_registered(uri: str, img_size: int | None) -> tuple[dict[str, nn.Module], dict]:
    """The served model (registry/pyfunc.py) behind a models:/ or runs:/ URI."""
    from components.registry import client as registry
    from components.registry import pyfunc

    client, tracking_uri = registry.client_for()
    tracking.check_reachable(tracking_uri)
    try:
        net, info = pyfunc.load_network(uri)
    except Exception as err:  # noqa: BLE001 - one clear line, never the URI's password
        raise FileNotFoundError(tracking.scrub(f"cannot load {uri} from "
                                               f"{tracking.redact(tracking_uri)}: {err}")) from None
    weights = net.state_dict()
    checkpoint.check_finite(weights, uri)
    run_id = info.get("source", "").removeprefix("runs:/") or None
    return {"ema": net}, {**{k: info.get(k) for k in ("prepare_size", "color_constancy",
                                                      "minkowski_p")},
                          "classes": tuple(info["classes"]),
                          "img_size": img_size or int(info["img_size"]),
                          "weights_digest": checkpoint.weights_digest(weights),
                          "mlflow_run_id": run_id, "fitted": info["fitted"],
                          "fit_reason": info["fit_reason"]}


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
            if not torch.isfinite(p).all():
                raise ModelRefused(f"the {name} model gives NaN/inf outputs; not scoring it")
            chunks[name].append(p.double().cpu().numpy())
    return {name: np.concatenate(c) for name, c in chunks.items()}


def flips(images: torch.Tensor) -> list[torch.Tensor]:
    """The image, its horizontal, vertical and double flip: averaging over this group makes
    the prediction the same for an image and any flip of it."""
    return [images, images.flip(-1), images.flip(-2), images.flip((-2, -1))]


def report(frame: pd.DataFrame, probs: np.ndarray, out: Path, *, groups=None,
           cfg: EvaluateConfig | None = None, temperature: float | None = None) -> dict:
    """Metrics with bootstrap intervals; tables, plot data and figures written to `out`.
    With the fitted `temperature`: NLL, Brier and ECE before and after scaling, both drawn in
    the reliability diagram."""
    cfg = cfg or EvaluateConfig()
    y_true = frame["label"].to_numpy()
    m = classification_metrics(y_true, probs, CLASSES)
    per_class = m.pop("per_class")
    m["ci95"] = bootstrap_intervals(y_true, probs, groups=groups, n=cfg.bootstrap, seed=cfg.seed)
    unit = "lesion" if groups is not None and pd.notna(groups).any() else "image"
    m["bootstrap"] = {"resamples": cfg.bootstrap, "seed": cfg.seed, "unit": unit, "level": 0.95}
    m["melanoma_operating_point"] = operating_point(y_true, probs, MELANOMA,
                                                    cfg.melanoma_specificity)

    names = np.asarray(CLASSES)
    predictions = pd.DataFrame({"image": frame["image"], "true": names[y_true],
                                "predicted": names[probs.argmax(axis=1)]})
    predictions[[f"prob_{c}" for c in CLASSES]] = probs
    _write_csv(out / outputs.PREDICTIONS, predictions)
    _write_csv(out / outputs.PER_CLASS,
               pd.DataFrame.from_dict(per_class, orient="index").rename_axis("class"),
               index=True)
    _write_csv(out / outputs.ROC, pd.DataFrame(roc_points(y_true, probs, CLASSES)))
    bins = reliability_bins(y_true, probs)
    table = pd.DataFrame(bins)
    _write_csv(out / outputs.RELIABILITY, table[table["count"] > 0])
    calibrated = None
    if temperature is not None:
        scaled = calibration.rescale_probs(probs, temperature)
        m["calibration"] = {"temperature": temperature, "fitted_on": "validation",
                            "before": calibration.scores(y_true, probs),
                            "after": calibration.scores(y_true, scaled)}
        calibrated = (reliability_bins(y_true, scaled), m["calibration"]["after"]["ece"])

    if plots is None:
        log.warning("matplotlib is not installed: no figures in %s", out)
        return m
    plots.plot_confusion(m["confusion_matrix"], CLASSES, out / "confusion_matrix.png")
    plots.plot_confusion(m["confusion_matrix"], CLASSES, out / "confusion_matrix_normalized.png",
                         normalize=True)
    plots.plot_roc(y_true, probs, CLASSES, out / "roc.png")
    plots.plot_reliability(bins, m["ece"], out / "reliability.png", calibrated)
    return m


def per_source(frame: pd.DataFrame, probs: np.ndarray, source: pd.Series, groups,
               cfg: EvaluateConfig) -> dict:
    """The headline metrics with their intervals for each source of the test set (cross-site:
    a model good on one hospital's images can fail on another's)."""
    out = {}
    for name, rows in frame.groupby(source).indices.items():
        y = frame["label"].to_numpy()[rows]
        m = classification_metrics(y, probs[rows], CLASSES)
        ci = bootstrap_intervals(y, probs[rows], n=cfg.bootstrap, seed=cfg.seed,
                                 groups=None if groups is None else groups[rows])
        out[str(name)] = {"n_images": m["n_images"],
                            **{k: m[k] for k in HEADLINE_SHOWN},
                            "ci95": {k: ci[k] for k in HEADLINE_SHOWN},
                            "melanoma_operating_point": operating_point(
                                y, probs[rows], MELANOMA, cfg.melanoma_specificity)}
    return out


def _write_csv(path: Path, table: pd.DataFrame, index: bool = False) -> None:
    atomic.write_text(path, table.to_csv(index=index, float_format="%.6f"))


def main(argv: list[str] | None = None) -> int:
    parser = cli_args.ArgumentParser(prog="python -m components.evaluate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="training output folder, checkpoint, or MLflow model URI")
    parser.add_argument("--test_csv", required=True)
    parser.add_argument("--img_dir", required=True)
    parser.add_argument("--out", required=True)
    cli_args.add_params_flags(parser)
    cli_args.add_config_flags(parser, EvaluateConfig)
    parser.add_argument("--img_size", type=int, help="override the model's input size")
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--no_mlflow", dest="use_mlflow", action="store_false",
                        help="do not log to MLflow")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = EvaluateConfig.resolve(cli_args.params_paths(args),
                                     **cli_args.config_flags(args, EvaluateConfig))
        summary = run(args.model, args.test_csv, args.img_dir, args.out, config=cfg,
                      img_size=args.img_size, device=args.device, num_workers=args.num_workers,
                      use_mlflow=args.use_mlflow)
    except (ConfigError, ModelRefused, checkpoint.CheckpointError,
            tracking.TrackingUnreachable, decisions.CalibrationFileError) as err:
        print(f"evaluate: {tracking.scrub(str(err))}", file=sys.stderr)
        return 1
    except OSError as err:  # a missing input, a read-only or full output folder
        print(f"evaluate: {tracking.scrub(cli_args.os_error(err))}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
