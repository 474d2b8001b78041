"""KFP v2 lightweight components: one per pipeline step, each a thin call of the same
`components.<step>.run` that the DVC stage and the CLI call.

Rules every component here follows:

* `base_image` is the project's image (`IMAGE` below) and `install_kfp_package=False`: the
  image already has kfp and the project installed, and nothing is pip-installed at run time.
* The body imports project code itself (`from components import split`): KFP ships only the
  function's source to the container.
* A step's settings arrive as its params.yaml section, a dict (`train_params`, ...); the
  step's config class reads it (`TrainConfig.from_dict`), which also undoes protobuf
  Struct's turning every number into a float.
* Folders are passed as artifacts whose layout is components/common/outputs.py's, so the
  steps find their files exactly as under DVC.
* Every output artifact's `.metadata` carries the raw data's provenance (`data_hash`,
  `data_source`, `data_rev`, see `pipeline.data`), copied from the input artifacts
  (`pipeline.publish`, which also fills the train and evaluate steps' Metrics).
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

# The one image every KFP step runs in (built by `make image` from the project's Dockerfile;
# its tag follows the project's version). SKINLESION_IMAGE overrides it when this module is
# imported; `skinlesion pipeline compile --image` rewrites it in the compiled YAML.
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
    preprocess_params: dict,
):
    """components.preprocess.run: resize every labelled image once; keep the labels (and
    metadata) of the images kept."""
    import os

    from components import preprocess as step
    from components.common.config import PreprocessConfig
    from pipeline.publish import provenance

    metadata = os.path.join(raw.path, "metadata.csv")
    result = step.run(os.path.join(raw.path, "labels.csv"), os.path.join(raw.path, "images"),
                      prepared.path,
                      config=PreprocessConfig.from_dict(preprocess_params, "pipeline"),
                      metadata=metadata if os.path.isfile(metadata) else None)
    prepared.metadata.update(provenance(raw.metadata))
    prepared.metadata.update({k: v for k, v in result.items()
                              if k != "out" and isinstance(v, (int, float, str, bool))})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def split(
    prepared: Input[Dataset],
    splits: Output[Dataset],
    split_params: dict,
):
    """components.split.run over the images preprocess kept (grouped by lesion_id when the
    dataset has metadata)."""
    import os

    from components import split as step
    from components.common import outputs
    from components.common.config import SplitConfig
    from pipeline.publish import provenance

    metadata = os.path.join(prepared.path, outputs.KEPT_METADATA)
    report = step.run(os.path.join(prepared.path, outputs.KEPT_LABELS), splits.path,
                      config=SplitConfig.from_dict(split_params, "pipeline"),
                      metadata=metadata if os.path.isfile(metadata) else None)
    splits.metadata.update(provenance(prepared.metadata))
    splits.metadata.update({"mode": report["mode"], "seed": report["seed"],
                            "split_hash": report["split_hash"], "sizes": report.get("sizes", {})})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def class_weights(
    splits: Input[Dataset],
    weights: Output[Dataset],
    class_weights_params: dict,
):
    """components.class_weights.run: class weights and priors from train.csv."""
    import os

    from components import class_weights as step
    from components.common import outputs
    from components.common.config import ClassWeightsConfig
    from pipeline.publish import provenance

    step.run(os.path.join(splits.path, outputs.split_csv("train")), weights.path,
             config=ClassWeightsConfig.from_dict(class_weights_params, "pipeline"))
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
    from components.common import outputs
    from components.common.config import TrainConfig
    from pipeline.publish import configure_services, publish_training

    configure_services(mlflow_tracking_uri, s3_endpoint_url)
    config = TrainConfig.from_dict(train_params, "pipeline")
    data = step.TrainingData.read(
        os.path.join(splits.path, outputs.split_csv("train")),
        os.path.join(prepared.path, outputs.PREPARED_IMAGES),
        val_csv=os.path.join(splits.path, outputs.split_csv("val")),
        class_weights=weights.path,
    )
    summary = step.run(data, model.path, config=config, experiment=mlflow_experiment)
    publish_training(model, train_metrics, summary, prepared, splits, config)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_distributed(
    prepared: Input[Dataset],
    splits: Input[Dataset],
    weights: Input[Dataset],
    model: Output[Model],
    train_metrics: Output[Metrics],
    train_params: dict,
    run_id: str,
    node_resources: dict,
    shared_pvc: str,
    image: str,
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "skin-lesion",
    s3_endpoint_url: str = "",
    s3_secret: str = "skinlesion-s3",
    mlflow_secret: str = "skinlesion-mlflow",
):
    """components.train under torch-distributed on Kubeflow Trainer (train.nodes x
    train.gpus_per_node processes): stage the inputs on the shared volume, submit the TrainJob
    with the Kubeflow SDK, wait, and hand on the same Model artifact as the single-pod train.
    node_resources: each node's cpu and memory (kubeflow.resources.train)."""
    import json
    from pathlib import Path

    from components.common import outputs
    from components.common.config import TrainConfig
    from pipeline import trainjob
    from pipeline.publish import publish_training

    config = TrainConfig.from_dict(train_params, "pipeline")
    run_dir = Path(trainjob.MOUNT) / "runs" / run_id
    paths = trainjob.stage_inputs(run_dir, Path(prepared.path), Path(splits.path),
                                  Path(weights.path), train_params)
    env = {"MLFLOW_TRACKING_URI": mlflow_tracking_uri, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint_url,
           "AWS_ENDPOINT_URL": s3_endpoint_url, "MLFLOW_EXPERIMENT_NAME": mlflow_experiment}
    secrets = trainjob.secrets(s3_secret, mlflow_secret)
    request = trainjob.TrainJobRequest(
        image=image,
        nodes=config.nodes, gpus_per_node=config.gpus_per_node,
        train_args=trainjob.train_args(paths, mlflow_experiment), pvc=shared_pvc,
        cpu=node_resources["cpu"], memory=node_resources["memory"],
        name=f"skinlesion-{run_id}"[:63].lower(), env={k: v for k, v in env.items() if v},
        secrets=secrets)
    client = trainjob.client_for()
    trainjob.wait(client, trainjob.submit(request, client))
    trainjob.collect_outputs(paths["out_dir"], Path(model.path))
    summary = json.loads((Path(model.path) / outputs.TRAINING_SUMMARY).read_text())
    publish_training(model, train_metrics, summary, prepared, splits, config)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    model: Input[Model],
    prepared: Input[Dataset],
    splits: Input[Dataset],
    metrics: Output[Metrics],
    classification: Output[ClassificationMetrics],
    evaluation: Output[Artifact],
    evaluate_params: dict,
    mlflow_tracking_uri: str = "",
    s3_endpoint_url: str = "",
):
    """components.evaluate.run of the training folder (EMA weights first, raw weights under
    raw/), exactly as the DVC stage runs it."""
    import os

    from components import evaluate as step
    from components.common import outputs
    from components.common.config import EvaluateConfig
    from pipeline.publish import configure_services, kfp_outputs, provenance

    configure_services(mlflow_tracking_uri, s3_endpoint_url)
    result = step.run(model.path, os.path.join(splits.path, outputs.split_csv("test")),
                      os.path.join(prepared.path, outputs.PREPARED_IMAGES), evaluation.path,
                      config=EvaluateConfig.from_dict(evaluate_params, "pipeline"))
    kfp = kfp_outputs(evaluation.path)
    for name, value in kfp["scalars"]:
        metrics.log_metric(name, value)
    matrix = kfp["confusion_matrix"]
    classification.log_confusion_matrix(matrix["categories"], matrix["matrix"])
    if kfp["roc"]:
        roc = kfp["roc"]
        classification.log_roc_curve(roc["fpr"], roc["tpr"], roc["threshold"])
    for artifact in (metrics, classification, evaluation):
        artifact.metadata.update(provenance(model.metadata))
    evaluation.metadata["mlflow_run_id"] = result.get("mlflow_run_id") or ""


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(
    model: Input[Model],
    evaluation: Input[Artifact],
    splits: Input[Dataset],
    registration: Output[Artifact],
    register_params: dict,
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "skin-lesion",
    s3_endpoint_url: str = "",
) -> str:
    """components.register.run, gate included: the EMA model as a new MLflow model version
    (alias `challenger`) tagged with the data's provenance, or the reason it was not.
    Returns the registered version ("" when the gate refused)."""
    import json
    import os

    from components import register as step
    from components.common import outputs
    from components.common.config import RegisterConfig
    from pipeline.publish import configure_services, provenance

    configure_services(mlflow_tracking_uri, s3_endpoint_url)
    tags = provenance(model.metadata)
    result = step.run(model.path, os.path.join(evaluation.path, outputs.METRICS),
                      os.path.join(splits.path, outputs.SPLIT_REPORT),
                      config=RegisterConfig.from_dict(register_params, "pipeline"),
                      extra_tags=tags,
                      experiment=mlflow_experiment)
    os.makedirs(os.path.dirname(registration.path), exist_ok=True)
    with open(registration.path, "w") as f:
        json.dump(result, f, indent=2)
    registration.metadata.update(tags)
    registration.metadata.update({k: v for k, v in result.items()
                                  if isinstance(v, (str, bool, int, float))})
    return result["version"] or ""
