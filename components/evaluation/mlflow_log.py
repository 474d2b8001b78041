"""The evaluation in MLflow: `test_`-prefixed metrics (with their interval ends, per class and
per source), the output files as artifacts, and the test metrics in the run's description
(mlflow.note.content, which the MLflow UI shows on the run's page), with the cross-site report
when the test set holds several sources (evaluation/sites.py: within-source melanoma AUCs, the
gap to the pooled one, the site-shortcut flag)."""
from __future__ import annotations

import logging
from pathlib import Path

from components.common import tracking
from components.evaluation.metrics import HEADLINE, HEADLINE_SHOWN

log = logging.getLogger(__name__)

NOTE, NOTE_TEST = "mlflow.note.content", "## Test metrics"
CROSS_SITE = ("## Cross-site: melanoma ROC-AUC (prob_MEL) pooled and within each source, 95% "
              "intervals, (melanoma/other images)")
DIGEST_TAG = "evaluate.weights_digest"


def log_metrics(metrics: dict, out: Path, training_run_id: str | None,
                variants: list[str]) -> str:
    """Log `test_`-prefixed metrics and the output files into the training run when the
    store knows it, else into a new evaluation run tagged with it; returns the run id."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking.tracking_uri()
    tracking.check_reachable(uri)
    tracking.use_uri(uri)
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
        for name in variants:
            if isinstance(metrics.get(name), dict):
                mlflow.log_metrics(_flat_metrics(metrics[name], f"test_{name}_"))
        note = mlflow.get_run(active.info.run_id).data.tags.get(NOTE, "")
        # the weights scored: register finds this record of an untracked training by it
        mlflow.set_tags({"evaluate.weights": metrics["weights"],
                         DIGEST_TAG: metrics["weights_digest"],
                         "evaluate.tta": str(metrics["tta"]).lower(),
                         NOTE: note.split(NOTE_TEST)[0].rstrip() + "\n\n" + test_note(metrics)})
        mlflow.log_artifacts(str(out), artifact_path="evaluation")
        return active.info.run_id


def test_note(metrics: dict) -> str:
    """The test metrics with their intervals, for the run's description in the MLflow UI."""
    lines = [f"{NOTE_TEST} ({metrics['n_images']} images, 95% intervals over "
             f"{metrics['bootstrap']['unit']}s)"]
    for name in HEADLINE_SHOWN:
        ci = metrics["ci95"].get(name) or {}
        if metrics.get(name) is not None and ci.get("low") is not None:
            lines.append(f"- {name.replace('_', ' ')}: {metrics[name]:.3f} "
                         f"[{ci['low']:.3f}, {ci['high']:.3f}]")
    if point := metrics.get("melanoma_operating_point"):
        lines.append(f"- melanoma sensitivity {point['sensitivity']:.3f} at specificity "
                     f"{point['specificity']:.3f}")
    if cross_site := metrics.get("cross_site"):
        lines += ["", CROSS_SITE, *cross_site["summary"]]
    return "\n".join(lines) + "\n"


def _flat_metrics(m: dict, prefix: str) -> dict[str, float]:
    flat = {f"{prefix}{k}": m[k] for k in ("n_images", *HEADLINE) if m.get(k) is not None}
    flat.update({f"{prefix}roc_auc_{c}": v for c, v in m["roc_auc_per_class"].items()
                 if v is not None})
    for k, ci in m["ci95"].items():
        flat.update({f"{prefix}{k}_ci_{end}": ci[end] for end in ("low", "high")
                     if ci[end] is not None})
    if point := m.get("melanoma_operating_point"):
        flat.update({f"{prefix}melanoma_{k}": point[k]
                     for k in ("sensitivity", "specificity", "threshold")})
    for source, sm in (m.get("per_source") or {}).items():
        flat.update({f"{prefix}{source}_{k}": sm[k] for k in HEADLINE_SHOWN
                     if sm.get(k) is not None})
    for task, t in ((m.get("cross_site") or {}).get("tasks") or {}).items():
        figures = {"pooled": t["pooled"], **t["within"]}
        flat.update({f"{prefix}{where}_{task}_auc": f["auc"] for where, f in figures.items()
                     if f["auc"] is not None})
        if t["gap"]["value"] is not None:
            flat[f"{prefix}{task}_site_gap"] = t["gap"]["value"]
        if t["shortcut"] is not None:
            flat[f"{prefix}{task}_site_shortcut"] = float(t["shortcut"])
    return flat
