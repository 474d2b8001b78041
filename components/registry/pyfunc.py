"""The serving model in MLflow: logging it into a training run (one model per run), finding an
earlier logged copy, and loading it back as a network for evaluation.

The model is `serving.py` logged as code ("models from code": MLflow stores the file, never a
pickle) with its artifacts, weights.safetensors, preprocessing.json and (when fitted)
calibration.json, and the `model` and `components` packages as code paths. Its requirements are pinned here, once.
"""
from __future__ import annotations

import contextlib
import tempfile
import warnings
from pathlib import Path

ARTIFACT_NAME = "classifier"          # the pyfunc model's name inside the training run
CARD_ARTIFACT = "model_card.json"
ROOT = Path(__file__).resolve().parents[2]
# What the served model imports (explicit pins: MLflow's inference would import the model in
# a subprocess, slowly).
REQUIREMENTS = ("mlflow", "torch", "torchvision", "timm", "safetensors", "pillow", "pandas",
                "numpy", "pyyaml")


def requirements() -> list[str]:
    """Pinned runtime requirements of the serving model, from what is installed."""
    import importlib.metadata as md

    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={md.version(name).split('+')[0]}")
        except md.PackageNotFoundError:
            out.append(name)
    return out


def pyfunc_kwargs(artifacts: dict, classes: list[str]) -> dict:
    """Arguments of mlflow.pyfunc.log_model / save_model for the serving model."""
    from components.registry import serving

    # model_config: MLflow lets a loader override only the keys logged here; paths stay off
    # unless a local loader (skinlesion predict) turns them on.
    return dict(python_model=str(Path(serving.__file__).resolve()), artifacts=artifacts,
                code_paths=[str(ROOT / "model"), str(ROOT / "components")],
                signature=serving.signature(classes), pip_requirements=requirements(),
                model_config={"allow_paths": False})


def log_model(run_id: str, state_dict: dict, meta: dict, calibration=None) -> tuple[str, str]:
    """Log the serving model of these weights into run `run_id` as `classifier`; returns its
    (models:/ URI, model id). `meta` as checkpoint.load_model gives it, plus weights_digest;
    `calibration`: the calibration.json fitted for these weights, if any."""
    import mlflow

    from components.registry import serving

    with tempfile.TemporaryDirectory(prefix="pyfunc-") as tmp:
        artifacts = serving.write_artifacts(state_dict, meta, tmp, source=f"runs:/{run_id}",
                                            calibration=calibration)
        # start_run(run_id) refuses a run outside the process's active experiment, which an
        # earlier call in the same process may have set to another one.
        mlflow.set_experiment(experiment_id=mlflow.get_run(run_id).info.experiment_id)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # input-example advice
            active = mlflow.active_run()
            with (mlflow.start_run(run_id=run_id) if active is None or
                  active.info.run_id != run_id else contextlib.nullcontext()):
                info = mlflow.pyfunc.log_model(name=ARTIFACT_NAME,
                                               **pyfunc_kwargs(artifacts, list(meta["classes"])))
    return info.model_uri, info.model_id


def existing_model(client, run, name: str = ARTIFACT_NAME):
    """A pyfunc model already logged into the run under `name` (by training, or an earlier,
    interrupted register), or None."""
    try:
        models = client.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{name}'")
    except Exception:  # noqa: BLE001 - older stores: just log a new one
        return None
    ready = [m for m in models if str(getattr(m, "status", "")).endswith("READY")]
    return ready[0] if ready else None


def load_network(model_uri: str, device: str = "cpu"):
    """(network in eval mode, preprocessing dict plus `fitted`, its calibration file or None,
    and `fit_reason`, why None) of a logged serving model: any MLflow model URI
    (`models:/NAME@ALIAS`, `runs:/ID/classifier`, `models:/m-<id>`) or a local model folder."""
    import mlflow

    from components.registry import serving

    if Path(model_uri).exists():
        classifier = serving.load_local(model_uri, device=device)
    else:
        with tempfile.TemporaryDirectory(prefix="model-") as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
            classifier = serving.load_local(local, device=device)
    return classifier.net, {**classifier.info, "fitted": classifier.fitted,
                            "fit_reason": classifier.no_fit_reason}
