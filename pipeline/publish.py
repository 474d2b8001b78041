"""What a KFP task does around a step's `run()`: point MLflow and S3 at the run's services
before it (`configure_services`), and after it fill the task's output artifacts: the raw
data's provenance in every artifact's `.metadata` (`provenance`), the train step's Model and
Metrics artifacts (`publish_training`), and the evaluate step's Metrics and
ClassificationMetrics in the shapes KFP takes (`kfp_outputs`, `kfp_metrics`).

The functions take the artifacts (or plain dicts) as arguments and import no kfp: the KFP
wrappers (pipeline/kfp_components.py) call them from their bodies inside the image.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from components.common import outputs
from components.common.labels import CLASSES
from components.evaluation.metrics import HEADLINE

# metadata keys that travel from the raw dataset (pipeline/data.py) into every later artifact
PROVENANCE_KEYS = ("data_hash", "data_source", "data_rev")


def provenance(metadata: dict) -> dict:
    """The provenance part of an input artifact's metadata, to copy into an output's."""
    return {k: metadata[k] for k in PROVENANCE_KEYS if k in metadata}


def configure_services(mlflow_tracking_uri: str = "", s3_endpoint_url: str = "",
                       mlflow_experiment: str = "") -> None:
    """Point MLflow (and boto3 under it) at the run's services through the environment.

    Credentials are not handled here: on the cluster they arrive as environment variables
    from Kubernetes secrets (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD).
    """
    if mlflow_tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_tracking_uri
    if mlflow_experiment:
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", mlflow_experiment)
    if s3_endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint_url          # boto3 >= 1.28
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint_url    # MLflow's own setting


def publish_training(model, train_metrics, summary: dict, prepared, splits, config) -> None:
    """Fill the train step's Model and Metrics artifacts from training_summary.json: the same
    for the single-pod and the distributed train component, so downstream steps and the KFP
    UI cannot tell them apart."""
    for artifact in (model, train_metrics):
        artifact.metadata.update(provenance(prepared.metadata))
        artifact.metadata["split_hash"] = splits.metadata.get("split_hash", "")
    model.metadata.update({"mlflow_run_id": summary.get("mlflow_run_id") or "",
                           "mlflow_model_uri": summary["paths"].get("mlflow_model_uri") or "",
                           "framework": "pytorch", "preset": config.preset,
                           "img_size": config.img_size, "nodes": config.nodes,
                           "gpus_per_node": config.gpus_per_node})
    scalars = {k: summary[k] for k in ("epochs", "steps", "best_epoch", "seconds")}
    for section in ("best", "final", "test"):
        scalars.update({f"{section}_{k}": v for k, v in (summary.get(section) or {}).items()
                        if k != "epoch"})
    for key, value in scalars.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            train_metrics.log_metric(key, float(value))


def kfp_outputs(out: str | os.PathLike, max_points: int = 200) -> dict:
    """What the KFP wrapper logs, from an evaluate output folder: see kfp_metrics
    ({"scalars", "confusion_matrix", "roc"}; ROC micro-averaged from predictions.csv)."""
    out = Path(out)
    metrics = json.loads((out / outputs.METRICS).read_text())
    predictions = pd.read_csv(out / outputs.PREDICTIONS)
    y_true = predictions["true"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    probs = predictions[[f"prob_{c}" for c in CLASSES]].to_numpy()
    return kfp_metrics(metrics, y_true, probs, max_points=max_points)


def kfp_metrics(metrics: dict, y_true=None, probs=None, max_points: int = 200) -> dict:
    """What KFP's Metrics and ClassificationMetrics artifacts take, from a metrics dict
    (metrics.json) and optionally the predictions behind it.

    Returns {"scalars": [(name, value), ...] for Metrics.log_metric,
             "confusion_matrix": {"categories": [...], "matrix": [[...], ...]}
                 for ClassificationMetrics.log_confusion_matrix,
             "roc": {"fpr": [...], "tpr": [...], "threshold": [...]} or None
                 for ClassificationMetrics.log_roc_curve (micro-average over classes: KFP
                 holds one curve; at most `max_points` points; thresholds clipped to [0, 1])}.
    """
    scalars = [(name, float(metrics[name])) for name in ("n_images", *HEADLINE)
               if metrics.get(name) is not None]
    scalars += [(f"{name}_ci_{end}", float(ci[end])) for name, ci in
                metrics.get("ci95", {}).items() for end in ("low", "high") if ci[end] is not None]
    scalars += [(f"roc_auc_{c}", float(v)) for c, v in
                metrics.get("roc_auc_per_class", {}).items() if v is not None]
    if point := metrics.get("melanoma_operating_point"):
        scalars += [("melanoma_sensitivity", point["sensitivity"]),
                    ("melanoma_specificity", point["specificity"]),
                    ("melanoma_threshold", point["threshold"])]
    for name, decision in (metrics.get("decisions") or {}).items():  # thresholds from validation
        scalars += [(f"{name}_{k}", float(decision[k]))
                    for k in ("threshold", "sensitivity", "specificity")
                    if decision.get(k) is not None]
    if calibration := metrics.get("calibration"):
        scalars.append(("temperature", float(calibration["temperature"])))
        scalars += [(f"{k}_{when}", float(v)) for when in ("before", "after")
                    for k, v in calibration.get(when, {}).items() if v is not None]
    if ood := metrics.get("ood"):
        scalars += [(f"ood_{k}", float(ood[k])) for k in ("auroc", "threshold")
                    if ood.get(k) is not None]
    for source, sm in (metrics.get("per_source") or {}).items():
        scalars += [(f"{source}_{k}", float(v)) for k, v in sm.items()
                    if isinstance(v, float)]
    out = {"scalars": scalars,
           "confusion_matrix": {"categories": list(metrics["classes"]),
                                "matrix": [list(map(int, r)) for r in metrics["confusion_matrix"]]},
           "roc": None}
    if y_true is not None and probs is not None:
        k = len(metrics["classes"])
        onehot = np.eye(k, dtype=bool)[np.asarray(y_true)]
        fpr, tpr, thr = roc_curve(onehot.ravel(), np.asarray(probs, dtype=np.float64).ravel())
        keep = np.unique(np.linspace(0, len(fpr) - 1, min(max_points, len(fpr))).astype(int))
        out["roc"] = {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist(),
                      "threshold": np.clip(thr[keep], 0.0, 1.0).tolist()}
    return out
