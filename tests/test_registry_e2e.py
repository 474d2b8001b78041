"""The registry against real services: an `mlflow server` subprocess (SQLite backend) whose
artifacts the server proxies to a bucket on a moto S3 server, both on 127.0.0.1.

train tiny -> evaluate -> register (challenger) -> promote (first champion) -> a second tiny
run -> register -> promote moves champion only when better -> predict through the alias; the
pyfunc model predicts two images in-process; the artifacts are in the bucket."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import boto3
import mlflow
import pandas as pd
import pytest

from components import evaluate, register, train
from components.common.config import EvaluateConfig

from components.commands import promote, predict, runs
from components.common.labels import CLASSES
from mlflow_server import start_mlflow_server
from s3server import FAKE_AWS_ENV, moto_s3_server
from tiny_data import make_splits

BUCKET, PREFIX = "mlflow-e2e", "artifacts"
NAME = "skin-lesion-hybrid"


def mlflow_server_on_s3(root: Path, endpoint: str):
    """`mlflow server --artifacts-destination s3://BUCKET/PREFIX`, S3 at `endpoint`."""
    env = {**os.environ, **FAKE_AWS_ENV, "MLFLOW_S3_ENDPOINT_URL": endpoint}
    return start_mlflow_server(root, f"s3://{BUCKET}/{PREFIX}", env=env)


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    with moto_s3_server() as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.create_bucket(Bucket=BUCKET)
        with mlflow_server_on_s3(root, endpoint) as uri:
            yield {"uri": uri, "s3": s3, "root": root}


def _split_report(data: dict) -> dict:
    digest = hashlib.sha256()
    for split in ("train", "val", "test"):
        digest.update(Path(data[split]).read_bytes())
    return {"mode": "grouped", "seed": 0, "split_hash": digest.hexdigest(),
            "sizes": {s: len(pd.read_csv(data[s])) for s in ("train", "val", "test")}}


def _train_and_evaluate(data: dict, out: Path, seed: int, epochs: int) -> Path:
    cfg = train.TrainConfig(preset="tiny", img_size=32,
                            batch_size=8, warmup_epochs=1, num_workers=0, epochs=epochs,
                            seed=seed, gpu_resident="off", self_supervised_epochs=0)
    train.run(train.TrainingData.read(data["train"], data["img_dir"], val_csv=data["val"]),
              out / "train", config=cfg)
    evaluate.run(out / "train", data["test"], data["img_dir"], out / "eval",
                 config=EvaluateConfig(bootstrap=50))
    return out / "eval" / "metrics.json"


def test_train_register_promote_predict_on_real_services(services, tmp_path, monkeypatch):
    uri, s3 = services["uri"], services["s3"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)  # the client reaches S3 only through the server
    data = make_splits(tmp_path / "data", n_per_class=3, size=40)
    report = _split_report(data)
    client = mlflow.MlflowClient(uri, registry_uri=uri)

    # run 1 -> version 1 @challenger -> first champion
    metrics1 = _train_and_evaluate(data, tmp_path / "r1", seed=0, epochs=1)
    first = register.run(tmp_path / "r1" / "train", metrics1, report)
    assert first["name"] == NAME and first["version"] == "1" and first["alias"] == "challenger"
    again = register.run(tmp_path / "r1" / "train", metrics1, report)
    assert again["version"] == "1" and not again["created"]
    version = client.get_model_version(NAME, "1")
    assert version.tags["split_hash"] == report["split_hash"]
    assert float(version.tags["test_balanced_accuracy"]) == pytest.approx(
        client.get_run(first["run_id"]).data.metrics["test_balanced_accuracy"], abs=1e-6)
    assert "not a medical device" in version.description
    assert promote.run("balanced_accuracy")["decision"] == "first"

    # run 2 -> version 2 @challenger; the gate keeps or moves the champion on the metric
    metrics2 = _train_and_evaluate(data, tmp_path / "r2", seed=1, epochs=2)
    second = register.run(tmp_path / "r2" / "train", metrics2, report)
    assert second["version"] == "2" and second["run_id"] != first["run_id"]
    edited = {**json.loads(metrics2.read_text()), "balanced_accuracy": 0.99}
    with pytest.raises(register.LineageError, match="balanced_accuracy = 0.99 but evaluate logged"):
        register.run(tmp_path / "r2" / "train", edited, report)  # checked against the run
    kept = promote.run("balanced_accuracy", min_delta=1.0)  # no score improves by more than 1
    assert kept["decision"] == "kept" and str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    natural = promote.run("balanced_accuracy")
    better = natural["challenger_value"] > natural["champion_value"]
    assert natural["decision"] == ("promoted" if better else "kept")
    if not better:  # make the move happen as well: a recorded human override
        assert promote.run("balanced_accuracy", force=True,
                           reason="the test needs v2 as champion")["decision"] == "forced"
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"

    # predict through the alias (artifacts come from S3 through the server)
    images = [data["img_dir"] / "test_0000.jpg", data["img_dir"] / "test_0005.jpg"]
    result = predict.run(f"models:/{NAME}@champion", [str(p) for p in images], tmp_path / "p.csv")
    table = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert result["n_failed"] == 0, result["failed"]
    assert len(table) == 2 and set(table["predicted"]) <= set(CLASSES)

    # evaluate scores the registered model itself (the pyfunc's weights, as the run scored them)
    evaluate.run(f"models:/{NAME}@champion", data["test"], data["img_dir"], tmp_path / "reg_eval",
                 config=EvaluateConfig(bootstrap=50), use_mlflow=False)
    by_uri = json.loads((tmp_path / "reg_eval" / "metrics.json").read_text())
    by_file = json.loads(metrics2.read_text())
    assert by_uri["weights_digest"] == by_file["weights_digest"]
    assert by_uri["balanced_accuracy"] == pytest.approx(by_file["balanced_accuracy"], abs=1e-6)

    # pyfunc in-process on two images, one as a path and one as bytes (paths: a local use)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion", model_config={"allow_paths": True})
    out = model.predict(pd.DataFrame({"image": [str(images[0]), images[1].read_bytes()]}))
    assert (out["error"] == "").all()
    pd.testing.assert_frame_equal(out[list(CLASSES)], table[list(CLASSES)], atol=1e-5,
                                  check_dtype=False)

    # the registered files are in the bucket, not on a local disk
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=PREFIX)
            for o in page.get("Contents", [])]
    assert sum(k.endswith("weights.safetensors") for k in keys) == 2  # one model per run
    assert any(k.endswith("/serving.py") for k in keys) and any(k.endswith("/MLmodel") for k in keys)

    # the comparison table knows both runs and their versions
    listing = runs.run(top=5)
    assert set(listing["registered"]) == {f"{NAME} v1 @previous-champion", f"{NAME} v2 @challenger,@champion"}
