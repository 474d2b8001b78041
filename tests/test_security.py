"""Security: no secret reaches a log, a file or MLflow; an S3 endpoint refusing credentials is
named without printing them; no loader unpickles a payload.

The secret values below are fakes set only in these tests' environments; each test greps
everything it captured for them.
"""
from __future__ import annotations

import builtins
import contextlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from components import evaluate, register, train
from components.common import outputs
from components.common.config import RegisterConfig
from components.registry import serving
from components.registry.model_card import SECRETISH
from components.training import checkpoint
from procs import run_group
from tiny_data import TINY, make_splits

ROOT = Path(__file__).resolve().parents[1]
DVC = Path(sys.executable).with_name("dvc")
ACCESS_ID = "AKIAFAKEID7TESTONLY42"
AWS_SECRET = "fakeAwsSecret/Key+9f3bQ7xZ"
TRACKING_PASSWORD = "fakeTrackingPw-5d81c0"
URI_PASSWORD = "fakeUriPw-77aa31"
SECRETS = (AWS_SECRET, TRACKING_PASSWORD, URI_PASSWORD)
FAKE_ENV = {"AWS_ACCESS_KEY_ID": ACCESS_ID, "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_TRACKING_USERNAME": "fakeuser",
            "MLFLOW_TRACKING_PASSWORD": TRACKING_PASSWORD}


def leaks(blob: bytes | str, where: str) -> list[str]:
    data = blob.encode() if isinstance(blob, str) else blob
    return [f"{secret!r} in {where}" for secret in SECRETS if secret.encode() in data]


def tree_leaks(root: Path) -> list[str]:
    return [hit for p in sorted(root.rglob("*")) if p.is_file() for hit in leaks(p.read_bytes(), str(p))]


# -- no secret in params, logs, outputs or MLflow ------------------------------------------------
def test_no_secret_in_logs_outputs_or_mlflow(mlflow_server, tmp_path, monkeypatch, capfd):  # noqa: F811
    for key, value in FAKE_ENV.items():
        monkeypatch.setenv(key, value)
    uri = mlflow_server.replace("http://", f"http://fakeuser:{URI_PASSWORD}@")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false")  # restored after
    data = make_splits(tmp_path / "data")
    out, ev = tmp_path / "train", tmp_path / "eval"
    (tmp_path / "split.json").write_text(json.dumps({"mode": "grouped", "split_hash": "s" * 64}))

    assert train.main(["--train_csv", str(data["train"]), "--val_csv", str(data["val"]),
                       "--test_csv", str(data["test"]), "--img_dir", str(data["img_dir"]),
                       "--out_dir", str(out), *TINY, "--batch_size", "8", "--warmup_epochs", "1",
                       "--num_workers", "0", "--epochs", "1", "--experiment", "secrets"]) == 0
    assert evaluate.main(["--model", str(out), "--test_csv", str(data["test"]), "--img_dir",
                          str(data["img_dir"]), "--out", str(ev), "--bootstrap", "50",
                          "--num_workers", "0"]) == 0
    assert register.main(["--train_dir", str(out), "--metrics", str(ev / "metrics.json"),
                          "--split_report", str(tmp_path / "split.json"), "--params",
                          str(ROOT / "params.yaml"), "--model_name", "secrets-model",
                          "--no-gate", "--out", str(tmp_path / "register.json")]) == 0
    captured = capfd.readouterr()
    logs = captured.out + captured.err
    assert "done: 1 epochs" in logs  # the capture holds the steps' output

    summary = json.loads((out / outputs.TRAINING_SUMMARY).read_text())
    assert summary["tracking_uri"] == mlflow_server.replace("http://", "http://***@")
    client = mlflow.MlflowClient(mlflow_server, registry_uri=mlflow_server)
    records = []
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            records.append((run.data.params, run.data.tags, run.info.artifact_uri))
            dst = tmp_path / "artifacts" / run.info.run_id
            dst.mkdir(parents=True)
            mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(dst),
                                                tracking_uri=mlflow_server)
        for model in client.search_logged_models([exp.experiment_id]):
            records.append((model.params, model.tags, model.artifact_location))
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{model.model_id}", tracking_uri=mlflow_server,
                dst_path=str(tmp_path / "models" / model.model_id))
    versions = client.search_model_versions("name = 'secrets-model'")
    assert versions and any(r[0].get("train_csv") == str(data["train"]) for r in records)
    records += [(v.tags, v.description, v.source) for v in versions]
    records.append(client.get_registered_model("secrets-model").tags)
    # The registered model carries safetensors + code, never a pickle.
    registered = Path(mlflow.artifacts.download_artifacts(
        artifact_uri="models:/secrets-model/1", tracking_uri=mlflow_server,
        dst_path=str(tmp_path / "registered")))
    files = {p.name for p in registered.rglob("*") if p.is_file()}
    assert serving.WEIGHTS_FILE in files and not any(n.endswith((".pkl", ".pt")) for n in files)

    found = leaks(logs, "stdout/stderr") + leaks(repr(records), "MLflow params/tags/versions")
    found += tree_leaks(tmp_path)  # checkpoints, summary, metrics, register.json, artifacts
    assert not found, found


@pytest.mark.parametrize("uri", ["http://user:p@ss@mlflow.example:5000/api",
                                 "https://user:p@ss@w@rd@mlflow.example/api",
                                 "s3://key:se@cret@bucket/prefix"])
def test_a_raw_at_in_a_password_is_masked_whole(uri):
    """A password holding a raw `@` (not %40): nothing of it is shown, by scrub (free text) or
    redact (one URI), and the host stays readable."""
    from components.common.tracking import redact, scrub

    for shown in (scrub(f"cannot reach {uri}: refused"), redact(uri)):
        assert "ss@" not in shown and "cret" not in shown and "rd@" not in shown, shown
        assert "***@" in shown and ("example" in shown or "bucket" in shown), shown


def test_params_and_pipeline_files_hold_no_credentials():
    def walk(node, path=""):
        if isinstance(node, dict):
            for key, value in node.items():
                if SECRETISH.search(str(key)) and value not in (None, "", [], {}):
                    yield f"{path}{key}"
                yield from walk(value, f"{path}{key}.")
        elif isinstance(node, list):
            for item in node:
                yield from walk(item, path)

    files = [ROOT / name for name in ("params.yaml", "params.demo.yaml", "dvc.yaml")]
    assert all(f.is_file() for f in files)
    found = [f"{f.name}: {key}" for f in files for key in walk(yaml.safe_load(f.read_text()))]
    for config in (ROOT / ".dvc" / "config", ROOT / "dvc.yaml", ROOT / "params.yaml"):
        if config.is_file():  # credentials given inline anywhere (ini keys, URLs with user:pw)
            text = config.read_text()
            found += [f"{config.name}: {m}" for m in re.findall(
                r"(?im)^\s*(?:access_key_id|secret_access_key|session_token|password)\s*=.*$"
                r"|\w+://[^/\s:@]+:[^/\s@]+@", text)]
    assert not found, found


# -- an S3 endpoint refusing the credentials ---------------------------------------------------
REFUSAL = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidAccessKeyId</Code>'
           b"<Message>The AWS Access Key Id you provided does not exist in our records.</Message>"
           b"<RequestId>0</RequestId></Error>")


class _Refuse(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that answers every request 403 InvalidAccessKeyId."""
    protocol_version = "HTTP/1.1"

    def _refuse(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(REFUSAL)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(REFUSAL)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _refuse

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def refusing_s3():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def aws_env(tmp_path, monkeypatch) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update(FAKE_ENV, AWS_CONFIG_FILE=str(tmp_path / "none"), DVC_NO_ANALYTICS="1",
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               DVC_SITE_CACHE_DIR=str(tmp_path / "dvc-site-cache"))
    for key in [k for k in os.environ if k.startswith(("AWS_", "MLFLOW_"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    return env


def test_dvc_against_a_refusing_endpoint_prints_no_secret(refusing_s3, aws_env, tmp_path):
    if not DVC.is_file():
        pytest.skip(f"dvc CLI not found at {DVC}")
    repo = tmp_path / "repo"
    (repo / "data" / "raw").mkdir(parents=True)
    (repo / "data" / "raw" / "a.txt").write_text("a\n")

    def sh(*args: str) -> subprocess.CompletedProcess:
        return run_group(list(args), 120, cwd=repo, env=aws_env)

    for cmd in (["git", "init", "-q"], [str(DVC), "init", "-q"], [str(DVC), "add", "data/raw"],
                [str(DVC), "remote", "add", "-d", "storage", "s3://bucket/cache"],
                [str(DVC), "remote", "modify", "storage", "endpointurl", refusing_s3],
                ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "data"]):
        done = sh(*cmd)
        assert done.returncode == 0, done.stderr
    push = sh(str(DVC), "push")
    text = push.stdout + push.stderr
    assert push.returncode != 0 and "403" in text and "Forbidden" in text, text
    assert not leaks(text, "dvc push") and ACCESS_ID not in text
    # DVC's own message names neither the remote nor the endpoint (reported, not wrapped);
    # our caller, the pipeline's data step, adds both.
    from pipeline.data import materialise
    shutil.rmtree(repo / ".dvc" / "cache")  # so the data can only come from the remote
    shutil.rmtree(repo / "data" / "raw")
    with pytest.raises(RuntimeError) as err:
        materialise(tmp_path / "out", repo_url=str(repo), endpoint_url=refusing_s3)
    message = str(err.value)
    assert f"DVC remote (default) at {refusing_s3}" in message and "data/raw" in message
    assert not leaks(message, "materialise") and ACCESS_ID not in message


def test_mlflow_artifacts_on_a_refusing_endpoint_fail_naming_it(refusing_s3, aws_env, tmp_path,
                                                                monkeypatch, capfd):
    from test_register import EXPERIMENT, fake_training, metrics_json, split_report

    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", refusing_s3)
    # An experiment made active by an earlier in-process test (another store) would make
    # mlflow.start_run(run_id=...) refuse this store's run before any upload.
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).create_experiment(EXPERIMENT, artifact_location="s3://bucket/mlruns")
    out, run_id = fake_training(tmp_path, uri)
    metrics = metrics_json(out)
    # evaluate's record of these numbers (metrics only: its artifacts would meet the refusal)
    client = mlflow.MlflowClient(uri)
    for key, value in register.copied_numbers(metrics, "balanced_accuracy").items():
        client.log_metric(run_id, key, value)
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "split.json").write_text(json.dumps(split_report()))
    assert register.main(["--train_dir", str(out), "--metrics", str(tmp_path / "metrics.json"),
                          "--split_report", str(tmp_path / "split.json"), "--tracking_uri", uri,
                          "--no-gate"]) == 1
    captured = capfd.readouterr()
    text = captured.out + captured.err
    assert f"register: the MLflow artifact store at {refusing_s3} refused" in captured.err, text
    assert "InvalidAccessKeyId" in captured.err and "Traceback" not in text
    assert not leaks(text, "register") and ACCESS_ID not in captured.err


# -- pickles are never loaded ------------------------------------------------------------------
class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


def test_a_pickle_payload_is_refused_by_every_loader(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    bad = tmp_path / "out" / "checkpoint_last.pt"
    bad.parent.mkdir()
    torch.save({"format": checkpoint.FORMAT, "model": Payload(marker)}, bad)

    for load in (checkpoint.load, checkpoint.load_model,
                 lambda p: checkpoint.load_for_resume(p, fallback=True)):
        with pytest.raises(checkpoint.CheckpointError, match=re.escape(str(bad))):
            load(bad)
    split_csv = tmp_path / "train.csv"  # read (fingerprinted) before the checkpoint is loaded
    split_csv.write_text("image,label\n")
    assert train.main(["--train_csv", str(split_csv), "--img_dir", "x", "--out_dir",
                       str(bad.parent), "--resume", str(bad), "--no-mlflow"]) == 1
    err = capsys.readouterr().err
    assert f"checkpoint {bad} holds objects a weights-only load refuses" in err
    ema = tmp_path / "out" / "ema_weights.pt"
    ema.write_bytes(bad.read_bytes())
    with pytest.raises(checkpoint.CheckpointError):  # register reads it the same way
        register.run(tmp_path / "out", {}, {}, config=RegisterConfig(retries=0), use_gate=False,
                     tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")

    # The registered model's loader reads safetensors only: a pickle under its name is refused,
    # and a folder with only a .pt file is not a model.
    served = tmp_path / "served"
    served.mkdir()
    (served / serving.WEIGHTS_FILE).write_bytes(bad.read_bytes())
    (served / serving.PREPROCESSING_FILE).write_text(json.dumps({
        "format": serving.PREPROCESSING_FORMAT, "classes": ["a"], "prepare_size": 64,
        "model_config": {
            "num_classes": 8, "preset": "tiny"}}))
    with pytest.raises(Exception, match="(?i)header|safetensor|invalid"):
        serving.load_local(served, device="cpu")
    only_pt = tmp_path / "only_pt"
    only_pt.mkdir()
    (only_pt / "weights.pt").write_bytes(bad.read_bytes())
    with pytest.raises(FileNotFoundError, match=serving.WEIGHTS_FILE):
        serving.load_local(only_pt)

    assert not marker.exists(), "a loader ran the pickle's payload"
    with contextlib.suppress(Exception):  # the payload is live: a plain pickle load runs it
        torch.load(bad, weights_only=False)
    assert marker.exists()


def test_evaluate_of_a_registered_model_masks_the_password_when_the_server_is_down(
        tmp_path, monkeypatch, capsys):
    from procs import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{URI_PASSWORD}@127.0.0.1:{free_port()}")
    data = make_splits(tmp_path / "data")
    assert evaluate.main(["--model", "models:/skin-lesion-hybrid@champion", "--test_csv",
                          str(data["test"]), "--img_dir", str(data["img_dir"]),
                          "--out", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err
    assert "127.0.0.1" in err and "unreachable" in err
    assert URI_PASSWORD not in err and "alice" not in err
