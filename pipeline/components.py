"""KFP v2 lightweight components: one per pipeline step, each a thin call of
`components.<step>.run` inside the project's image.

Rules every component here follows:

* `base_image` is the project's image (`IMAGE` below, read when this module is imported)
  and `install_kfp_package=False`: the image already has kfp and the project installed, and
  nothing is pip-installed at run time.
* The body imports project code itself (`from components import split`): KFP ships only the
  function's source to the container.
* Every output artifact's `.metadata` carries the raw data's provenance (`data_hash`,
  `data_source`, `data_rev`, see `pipeline.data`), copied from the input artifacts.
* Nested dict parameters arrive through protobuf Struct, where every number is a float
  (100 -> 100.0); `_ints` turns integral floats back into ints before a step sees them.
"""
# no `from __future__ import annotations`: KFP reads these annotations at decoration time

import os

from kfp import dsl
from kfp.dsl import (
    Artifact,
    ClassificationMetrics,
    Dataset,
    Input,
    Metrics,
    Model,
    Output,
)

# The one image every KFP step runs in (built from the project's Dockerfile; keep its tag on
# the project's version). SKINLESION_IMAGE overrides it when this module is imported;
# `skinlesion pipeline compile --image` rewrites it in the compiled YAML.
DEFAULT_IMAGE = "ghcr.io/skinlesion/skinlesion:0.1.0"
IMAGE_ENV = "SKINLESION_IMAGE"
IMAGE = os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def materialise_data(
    raw: Output[Dataset],
    local_path: str = "",
    repo_url: str = "",
    rev: str = "",
    remote: str = "",
    path: str = "data/raw",
    endpoint_url: str = "",
) -> str:
    """Materialise data/raw (DVC remote at a git revision, or a local folder); return its hash."""
    from pipeline.data import materialise

    info = materialise(raw.path, local_path=local_path, repo_url=repo_url, rev=rev,
                       remote=remote, path=path, endpoint_url=endpoint_url)
    raw.metadata.update(info)
    return info["data_hash"]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def preprocess(
    raw: Input[Dataset],
    prepared: Output[Dataset],
    size: int = 256,
    skip_corrupt: bool = False,
):
    """components.preprocess.run: resize every labelled image once."""
    import os

    from components import preprocess as step
    from pipeline.data import provenance

    result = step.run(os.path.join(raw.path, "labels.csv"), os.path.join(raw.path, "images"),
                      prepared.path, size=size, skip_corrupt=skip_corrupt)
    prepared.metadata.update(provenance(raw.metadata))
    prepared.metadata.update({k: v for k, v in result.items()
                              if k != "out" and isinstance(v, (int, float, str, bool))})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def split(
    raw: Input[Dataset],
    splits: Output[Dataset],
    mode: str = "grouped",
    seed: int = 0,
    val_frac: float = 0.15,
    test_frac: float = 0.15,
):
    """components.split.run: train/val/test CSVs (grouped by lesion_id when metadata.csv exists)."""
    import os

    from components import split as step
    from pipeline.data import provenance

    metadata = os.path.join(raw.path, "metadata.csv")
    report = step.run(os.path.join(raw.path, "labels.csv"), splits.path,
                      metadata=metadata if os.path.isfile(metadata) else None,
                      mode=mode, seed=seed, val_frac=val_frac, test_frac=test_frac)
    splits.metadata.update(provenance(raw.metadata))
    splits.metadata.update({"mode": mode, "seed": seed, "split_hash": report["split_hash"],
                            "sizes": report.get("sizes", {})})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def class_weights(
    splits: Input[Dataset],
    weights: Output[Dataset],
):
    """components.class_weights.run: inverse-frequency class weights from train.csv."""
    import os

    from components import class_weights as step
    from pipeline.data import provenance

    step.run(os.path.join(splits.path, "train.csv"), weights.path)
    weights.metadata.update(provenance(splits.metadata))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(
    prepared: Input[Dataset],
    splits: Input[Dataset],
    weights: Input[Dataset],
    model: Output[Model],
    train_metrics: Output[Metrics],
    train_params: dict,
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "skin-lesion",
    s3_endpoint_url: str = "",
):
    """components.train.run; the Model artifact is its out_dir (checkpoint_last.pt,
    checkpoint_best.pt, ema_weights.pt, training_summary.json)."""
    import os

    from components import train as step
    from pipeline.data import configure_services, provenance

    def _ints(value):  # protobuf Struct made every number a float
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, list):
            return [_ints(v) for v in value]
        return value

    configure_services(mlflow_tracking_uri, s3_endpoint_url)
    config = step.TrainConfig.resolve(None, **{k: _ints(v) for k, v in train_params.items()})
    summary = step.run(
        os.path.join(splits.path, "train.csv"),
        os.path.join(prepared.path, "images"),
        model.path,
        val_csv=os.path.join(splits.path, "val.csv"),
        class_weights=weights.path,
        config=config,
        experiment=mlflow_experiment,
    )
    for artifact in (model, train_metrics):
        artifact.metadata.update(provenance(prepared.metadata))
        artifact.metadata["split_hash"] = splits.metadata.get("split_hash", "")
    model.metadata.update({"mlflow_run_id": summary.get("mlflow_run_id") or "",
                           "mlflow_model_uri": summary["paths"].get("mlflow_model_uri") or "",
                           "framework": "pytorch", "preset": config.preset,
                           "img_size": config.img_size})
    scalars = {k: summary[k] for k in ("epochs", "steps", "best_epoch", "seconds")}
    for section in ("best", "final", "test"):
        scalars.update({f"{section}_{k}": v for k, v in (summary.get(section) or {}).items()
                        if k != "epoch"})
    for key, value in scalars.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            train_metrics.log_metric(key, float(value))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    model: Input[Model],
    prepared: Input[Dataset],
    splits: Input[Dataset],
    metrics: Output[Metrics],
    classification: Output[ClassificationMetrics],
    evaluation: Output[Artifact],
    evaluate_params: dict,
    gate_metric: str = "balanced_accuracy",
    mlflow_tracking_uri: str = "",
    s3_endpoint_url: str = "",
) -> float:
    """components.evaluate.run of the EMA weights (the model that is registered) on the test
    split; returns the gate metric's value for the register gate."""
    import os

    from components import evaluate as step
    from pipeline.data import configure_services, provenance

    configure_services(mlflow_tracking_uri, s3_endpoint_url)
    options = {k: evaluate_params[k] for k in ("tta", "batch_size", "bootstrap", "seed")
               if k in evaluate_params}
    options.update({k: int(options[k]) for k in ("batch_size", "bootstrap", "seed") if k in options})
    result = step.run(os.path.join(model.path, "ema_weights.pt"),
                      os.path.join(splits.path, "test.csv"),
                      os.path.join(prepared.path, "images"),
                      evaluation.path, **options)
    outputs = step.kfp_outputs(evaluation.path)
    for name, value in outputs["scalars"]:
        metrics.log_metric(name, value)
    matrix = outputs["confusion_matrix"]
    classification.log_confusion_matrix(matrix["categories"], matrix["matrix"])
    if outputs["roc"]:
        roc = outputs["roc"]
        classification.log_roc_curve(roc["fpr"], roc["tpr"], roc["threshold"])
    for artifact in (metrics, classification, evaluation):
        artifact.metadata.update(provenance(model.metadata))
    evaluation.metadata["mlflow_run_id"] = result.get("mlflow_run_id") or ""
    if result.get(gate_metric) is None:
        raise ValueError(f"gate metric {gate_metric!r} is not among the evaluation's results "
                         f"{sorted(k for k, v in result.items() if isinstance(v, float))}")
    return float(result[gate_metric])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(
    model: Input[Model],
    evaluation: Input[Artifact],
    splits: Input[Dataset],
    registration: Output[Artifact],
    model_name: str,
    gate_metric: str,
    gate_value: float,
    preprocess_size: int = 256,
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "skin-lesion",
    s3_endpoint_url: str = "",
):
    """components.register.run: the EMA model as a new MLflow model version, alias
    `challenger`, tagged with the data's provenance. The pipeline runs it only past the
    metric gate (dsl.If), so the step's own gate is not asked again."""
    import json
    import os

    from components import register as step
    from pipeline.data import configure_services, provenance

    configure_services(mlflow_tracking_uri, s3_endpoint_url)
    tags = provenance(model.metadata)
    # register keeps the training run's own `data_hash` tag (prepared images + splits) when
    # there is one; the raw dataset's DVC hash goes on the version as `raw_data_hash` too
    extra = {**tags, "raw_data_hash": tags.get("data_hash", "")}
    result = step.run(model.path, os.path.join(evaluation.path, "metrics.json"),
                      os.path.join(splits.path, "split_report.json"), model_name=model_name,
                      extra_tags=extra, prepare_size=preprocess_size,
                      experiment=mlflow_experiment)
    os.makedirs(os.path.dirname(registration.path), exist_ok=True)
    with open(registration.path, "w") as f:
        json.dump({**result, "gate_metric": gate_metric, "gate_value": gate_value}, f, indent=2)
    registration.metadata.update(tags)
    registration.metadata.update({k: v for k, v in result.items()
                                  if isinstance(v, (str, bool, int, float))})
