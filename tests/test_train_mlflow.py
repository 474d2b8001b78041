"""Training against a real MLflow server: one run with params, per-epoch metrics, tags,
datasets and the EMA model; resume continues the run; an unreachable server fails fast."""
from __future__ import annotations

import base64
import json
import shutil
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from components.common import decisions, tracking
from components.common.labels import CLASSES
from components.registry import serving

from components import train
from procs import free_port, serve
from tiny_data import TINY, dvc_project, make_splits

FAST = [*TINY, "--batch_size", "8", "--warmup_epochs", "1", "--num_workers", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_splits(tmp_path_factory.mktemp("tiny"))


def _args(data, out, *extra):
    return ["--train_csv", str(data["train"]), "--val_csv", str(data["val"]),
            "--img_dir", str(data["img_dir"]), "--out_dir", str(out), *FAST, *extra]


def test_one_run_with_params_metrics_tags_datasets_and_model(data, tmp_path, mlflow_server,
                                                             monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    out = tmp_path / "out"
    assert train.main(_args(data, out, "--epochs", "2", "--test_csv", str(data["test"]),
                            "--experiment", "train-test")) == 0
    summary = json.loads((out / "training_summary.json").read_text())
    client = MlflowClient(mlflow_server)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"

    params = run.data.params
    assert params["train.peak_lr"] == "0.01" and params["train.preset"] == "tiny"
    assert params["train_csv"] == str(data["train"])
    tags = run.data.tags
    assert {"git_commit", "data_hash", "device"} <= set(tags)
    # the name says what differs from params.yaml's recipe (tiny_data writes no split report)
    assert run.info.run_name == tags["mlflow.runName"]
    assert run.info.run_name.startswith("tiny unsplit ")
    for part in ("ep=2", "img=32", "bs=8"):
        assert part in run.info.run_name.split(), part
    assert "preset `tiny`" in tags["mlflow.note.content"]
    assert "epochs 2" in tags["mlflow.note.content"]
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # not GenAI
    for name in ("train_loss", "lr", "epoch_seconds", "train_img_per_s", "val_accuracy",
                 "val_balanced_accuracy", "val_macro_f1", "val_ema_accuracy",
                 "val_ema_balanced_accuracy", "val_ema_macro_f1"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2], name
    assert "test_ema_balanced_accuracy" in run.data.metrics

    inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    assert {d.digest for d in inputs.values()} == {tags["data_hash"]}

    # one model per run: the serving model that register later registers
    model_uri = summary["paths"]["mlflow_model_uri"]
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         output_format="list")
    assert [m.name for m in models if m.source_run_id == run.info.run_id] == ["classifier"]
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(model_uri)
    images = sorted(data["img_dir"].iterdir())[:3]
    probs = model.predict(pd.DataFrame(
        {"image": [base64.b64encode(p.read_bytes()).decode() for p in images]}))
    assert probs.shape == (3, len(CLASSES) + len(serving.ANSWER_COLUMNS))
    assert (probs["error"] == "").all()
    # the served model carries the calibration the train step fitted for its weights
    assert (probs["reason"] != decisions.NO_FILE).all()
    assert probs["model_version"].str.fullmatch("[0-9a-f]{64}").all()
    np.testing.assert_allclose(probs.iloc[:, :8].sum(axis=1), 1.0, atol=1e-5)


def test_the_run_shows_the_projects_data_version(data, tmp_path, mlflow_server, monkeypatch):
    """The training run names the data it used (issue 27: `skinlesion data diff` compares such
    revisions): the project's git commit and the DVC hash in its data/raw.dvc, from the
    project root (DVC_ROOT under dvc), never from the folder the process runs in."""
    rev = dvc_project(tmp_path / "project", "0123abcd")
    dvc_project(tmp_path / "elsewhere", "ffff0000")
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "project"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    out = tmp_path / "out"
    assert train.main(_args(data, out, "--epochs", "1")) == 0
    run_id = json.loads((out / "training_summary.json").read_text())["mlflow_run_id"]
    tags = MlflowClient(mlflow_server).get_run(run_id).data.tags
    assert (tags["git_commit"], tags["data_rev"], tags["data_hash"]) == (rev, rev, "0123abcd")
    assert f"data/raw.dvc 0123abcd at git {rev[:12]}" in tags["mlflow.note.content"]


def test_run_names_tell_apart_runs_that_differ_in_any_setting():
    from components.common.config import TrainConfig
    from components.training.run_record import run_name

    base = TrainConfig(dims=(32, 64, 96, 128), epochs=3, img_size=64)
    names = {run_name(base, "grouped"), run_name(TrainConfig(**{**base.as_dict(), "peak_lr": 0.005}), "grouped"),
             run_name(TrainConfig(**{**base.as_dict(), "seed": 1}), "grouped"),
             run_name(TrainConfig(**{**base.as_dict(), "num_workers": 0}), "grouped")}
    assert len(names) == 3  # num_workers changes speed, not the result: not in the name
    assert run_name(TrainConfig(), "grouped") == "paper grouped"


def test_resume_continues_the_same_run(data, tmp_path, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    out = tmp_path / "out"
    assert train.main(_args(data, out, "--epochs", "2", "--stop_after_epoch", "1")) == 0
    first = json.loads((out / "training_summary.json").read_text())["mlflow_run_id"]
    assert train.main(_args(data, out, "--epochs", "2", "--resume",
                            str(out / "checkpoint_last.pt"))) == 0
    second = json.loads((out / "training_summary.json").read_text())["mlflow_run_id"]
    assert first == second
    history = MlflowClient(mlflow_server).get_metric_history(first, "train_loss")
    assert sorted(m.step for m in history) == [1, 2]


def test_unreachable_server_fails_within_seconds_naming_it(data, tmp_path, monkeypatch, capsys):
    uri = f"http://user:s3cret@127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    assert train.main(_args(data, tmp_path / "out", "--epochs", "1")) == 1
    assert time.monotonic() - start < 15
    err = capsys.readouterr().err
    assert "127.0.0.1" in err and "unreachable" in err and "s3cret" not in err
    # --no-mlflow trains regardless
    assert train.main(_args(data, tmp_path / "out2", "--epochs", "1", "--no-mlflow")) == 0


def test_default_tracking_uri_is_sqlite_in_the_project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.check_reachable(tracking.tracking_uri())
    # a stage of `dvc exp run --temp` runs in DVC's temporary copy; DVC_ROOT names the project
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "project"))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'project' / 'mlflow.db'}"


def test_a_sqlite_store_keeps_artifacts_beside_it_and_replaces_a_lost_location(
        tmp_path, monkeypatch, capsys):
    (tmp_path / "project").mkdir()
    uri = f"sqlite:///{tmp_path / 'project' / 'mlflow.db'}"
    client = MlflowClient(uri)
    # what MLflow's default did inside DVC's temporary copy, which DVC then deleted
    temporary = tmp_path / "exps" / "run" / "mlruns"
    temporary.mkdir(parents=True)
    lost = client.create_experiment("skin-lesion", artifact_location=(temporary / "1").as_uri())
    shutil.rmtree(tmp_path / "exps")
    monkeypatch.chdir(tmp_path)  # not the project: artifacts must not follow the process
    with tracking.start_run(uri, None, "skin-lesion") as active:
        mlflow.log_text("kept", "note.txt")
    found = client.get_experiment_by_name("skin-lesion")
    stored = tmp_path / "project" / "mlartifacts" / "skin-lesion"
    assert found.artifact_location == stored.as_uri()
    assert (stored / active.info.run_id / "artifacts" / "note.txt").read_text() == "kept"
    assert found.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND
    assert client.get_experiment(lost).name == f"skin-lesion (artifacts lost, id {lost})"
    assert "no longer exists" in capsys.readouterr().err
    # the next run finds the new experiment as it is
    with tracking.start_run(uri, None, "skin-lesion") as again:
        assert again.info.experiment_id == found.experiment_id


def test_flatten_and_redact():
    assert tracking.flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {
        "a.b": "1", "a.c": "[1, 2]", "d": "None"}
    assert tracking.redact("https://u:p@host:5000/x") == "https://***@host:5000/x"
    assert tracking.redact("http://host") == "http://host"


def test_tracking_server_serves_the_project_store_and_its_artifacts(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    with tracking.start_run(tracking.tracking_uri(), None, "skin-lesion") as before:
        mlflow.log_text("logged before the server", "note.txt")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    with serve([str(Path(sys.executable).with_name("skinlesion")), "tracking-server", "--port",
                str(port)], f"{uri}/health", tmp_path / "server.log", cwd=project):
        client = MlflowClient(uri)
        got = client.download_artifacts(before.info.run_id, "note.txt", str(tmp_path))
        assert Path(got).read_text() == "logged before the server"
        # an experiment the server creates keeps its files in the same folder
        experiment = client.create_experiment("through-the-server")
        run = client.create_run(experiment)
        client.log_text(run.info.run_id, "through the server", "note.txt")
    stored = list((project / tracking.ARTIFACTS_DIR).glob(f"*/{run.info.run_id}/artifacts/note.txt"))
    assert [p.read_text() for p in stored] == ["through the server"]
