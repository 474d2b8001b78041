"""register step on a local SQLite MLflow store: a version with a handful of lineage tags, a
card and an alias, idempotent, refusing metrics of other weights or splits, and a pyfunc model
that loads and predicts. Training is stood in for by a tiny model saved the way training saves
it (ema_weights.pt + training_summary.json + an MLflow run)."""
from __future__ import annotations

import base64
import json
import socket
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from components import register
from components.common import atomic, tracking
from components.common.config import RegisterConfig
from components.common.labels import CLASSES
from components.evaluation import mlflow_log
from components.registry import client as registry
from components.registry import model_card, pyfunc, serving
from components.training import checkpoint
from components.training.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from model import HybridConvNeXtV2

IMG = 32
PREPARE = 40
SPLIT = "s" * 64
EXPERIMENT = "skin-lesion"


def make_store(root: Path) -> str:
    """A SQLite tracking URI whose experiment keeps artifacts under `root` (not ./mlruns)."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    if client.get_experiment_by_name(EXPERIMENT) is None:
        client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    return uri


def fake_training(root: Path, uri: str, seed: int = 0, run_name: str | None = None,
                  epochs: int = 1, log_model: bool = False) -> tuple[Path, str]:
    """What components.train leaves behind: out_dir with ema_weights.pt and
    training_summary.json, and a run with train.* params and git/data tags (and, as a real
    training does, the serving model when log_model)."""
    torch.manual_seed(seed)
    model = HybridConvNeXtV2(num_classes=len(CLASSES), preset="tiny")
    out = root / f"train-{seed}-{run_name or 'x'}"
    meta = {"model_config": model.config, "classes": list(CLASSES), "img_size": IMG,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "prepare_size": PREPARE,
            "split_hash": SPLIT}
    checkpoint.save(out / "ema_weights.pt", {**meta, "ema": model.state_dict(), "epoch": epochs,
                                             "step": 10})
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    run = client.create_run(exp, run_name=run_name, tags={"git_commit": "abc123", "data_hash": "d" * 32})
    for key, value in {"train.preset": "paper", "train.epochs": epochs, "train.seed": seed,
                       "train.img_size": IMG, "train.batch_size": 8, "train.peak_lr": 0.01}.items():
        client.log_param(run.info.run_id, key, value)
    if log_model:
        mlflow.set_tracking_uri(uri)
        pyfunc.log_model(run.info.run_id, model.state_dict(), meta)
    client.set_terminated(run.info.run_id)
    atomic.write_json(out / "training_summary.json", {
        "completed": True, "mlflow_run_id": run.info.run_id,
        "paths": {"ema_weights": str(out / "ema_weights.pt")}})
    return out, run.info.run_id


def metrics_json(out: Path, value: float = 0.5, **extra) -> dict:
    """evaluate's metrics.json for the weights in `out` (their digest, the split trained on)."""
    weights = checkpoint.load(out / "ema_weights.pt")["ema"]
    return {"weights": "ema", "tta": False, "n_images": 20, "balanced_accuracy": value,
            "accuracy": value + 0.1, "f1_macro": value - 0.1, "ece": 0.1,
            "ci95": {"balanced_accuracy": {"low": value - 0.05, "high": value + 0.05}},
            "roc_auc_per_class": {}, "bootstrap": {"resamples": 100, "unit": "lesion"},
            "weights_digest": checkpoint.weights_digest(weights), "split_hash": SPLIT, **extra}


def evaluated(out: Path, uri: str, value: float = 0.5, **extra) -> dict:
    """metrics_json, logged to MLflow as evaluate logs it (into the training run of `out`, or
    for an untracked training a run of its own): the record register checks the file with."""
    metrics = metrics_json(out, value, **extra)
    folder = out / "eval"
    atomic.write_json(folder / "metrics.json", metrics)
    summary = out / "training_summary.json"
    run_id = json.loads(summary.read_text())["mlflow_run_id"] if summary.is_file() else None
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow_log.log_metrics(metrics, folder, run_id, [])
    return metrics


def cfg(name: str, **settings) -> RegisterConfig:
    return RegisterConfig(model_name=name, **settings)


def split_report(split_hash: str = SPLIT, mode: str = "grouped") -> dict:
    return {"mode": mode, "split_hash": split_hash, "sizes": {"train": 70, "val": 15, "test": 20}}


def write_images(folder: Path, n: int = 2, size=(48, 40)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.{'jpg' if i % 2 == 0 else 'png'}"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    return root, make_store(root)


@pytest.fixture(scope="module")
def registered(store):
    root, uri = store
    out, run_id = fake_training(root, uri, seed=1, run_name="paper-grouped-e1-s1", log_model=True)
    result = register.run(out, evaluated(out, uri, 0.5), split_report(), config=cfg("m-reg"),
                          tracking_uri=uri)
    return out, run_id, result


def test_register_creates_version_with_tags_card_and_alias(store, registered):
    _, uri = store
    out, run_id, result = registered
    assert result == {"name": "m-reg", "version": "1", "alias": "challenger", "run_id": run_id,
                      "created": True, "model_uri": "models:/m-reg/1", "aliases": ["challenger"]}
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version_by_alias("m-reg", "challenger")
    tags = version.tags
    assert version.run_id == run_id
    assert tags["source_run_id"] == run_id and tags["git_commit"] == "abc123"
    assert tags["data_hash"] == "d" * 32 and tags["split_hash"] == SPLIT
    assert len(tags["params_hash"]) == 16 and len(tags["weights_hash"]) == 64
    assert float(tags["test_balanced_accuracy"]) == pytest.approx(0.5)
    assert float(tags["test_balanced_accuracy_ci_low"]) == pytest.approx(0.45)
    assert len(tags) <= 10, f"a handful of lineage tags, not {sorted(tags)}"
    assert "not a medical device" in version.description
    assert "lesion-grouped" in version.description and "0.4500 - 0.5500" in version.description
    # the rest is in model_card.json beside the model, and the version reuses the run's
    # logged serving model instead of logging a second one
    card = client.download_artifacts(run_id, f"registry/m-reg-v1/{pyfunc.CARD_ARTIFACT}")
    details = json.loads(Path(card).read_text())
    assert details["test_metrics"]["accuracy"] == pytest.approx(0.6)
    assert details["preprocessing"]["prepare_size"] == PREPARE
    logged = client.search_logged_models(experiment_ids=[client.get_run(run_id).info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'")
    assert len(logged) == 1
    # the training run learns its split and its registered version
    run_tags = client.get_run(run_id).data.tags
    assert run_tags["split_hash"] == "s" * 64 and run_tags["registered_model"] == "m-reg/1"


def test_register_same_run_twice_is_one_version(store, registered):
    _, uri = store
    out, run_id, _ = registered
    again = register.run(out, metrics_json(out, 0.5), split_report(), config=cfg("m-reg"),
                         tracking_uri=uri)
    assert again["version"] == "1" and again["created"] is False
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    assert len(client.search_model_versions("name = 'm-reg'")) == 1


def test_registered_pyfunc_matches_evaluation_preprocessing(store, registered, tmp_path):
    """The registered model loads with mlflow.pyfunc (no pickle: models from code + safetensors)
    and gives the probabilities the checkpoint gives through evaluate's transform."""
    _, uri = store
    out, _, _ = registered
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/m-reg@challenger")
    images = write_images(tmp_path / "img", 2, size=(IMG + 5, IMG + 3))
    got = model.predict(pd.DataFrame(
        {"image": [base64.b64encode(p.read_bytes()).decode() for p in images]}))
    assert list(got.columns) == [*CLASSES, *(name for name, _ in serving.ANSWER_COLUMNS)]
    net, meta = checkpoint.load_model(out / "ema_weights.pt")
    tf = eval_transform(IMG)
    # pyfunc first resizes the short side to prepare_size, as the preprocess step did to
    # the images evaluate reads: the same two stages here
    from components.common.images import prepare_image
    info = model.unwrap_python_model().info
    batch = torch.stack([tf(prepare_image(p.read_bytes(), info["prepare_size"])[0]) for p in images])
    with torch.inference_mode():
        want = torch.softmax(net(batch), 1).numpy()
    np.testing.assert_allclose(got[list(CLASSES)].to_numpy(), want, rtol=1e-4, atol=1e-6)
    assert (got["predicted"] == [CLASSES[i] for i in want.argmax(1)]).all()
    assert (got["error"] == "").all()


def test_second_run_moves_challenger(store, registered):
    root, uri = store
    out2, run2 = fake_training(root, uri, seed=2, run_name="paper-grouped-e1-s2")
    result = register.run(out2, evaluated(out2, uri, 0.6), split_report(), config=cfg("m-reg"),
                          tracking_uri=uri)
    assert result["version"] == "2" and result["created"] and result["run_id"] == run2
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    assert str(client.get_model_version_by_alias("m-reg", "challenger").version) == "2"


def test_gate_skips_registration(store):
    root, uri = store
    out, _ = fake_training(root, uri, seed=3)
    result = register.run(out, evaluated(out, uri, 0.2), split_report(),
                          config=cfg("m-gate", gate_threshold=0.3), tracking_uri=uri)
    assert result["version"] is None and "below the gate" in result["skipped"]
    nan = register.run(out, evaluated(out, uri, float("nan")), split_report(),
                       config=cfg("m-gate", gate_threshold=0.0), tracking_uri=uri)
    assert nan["version"] is None  # NaN never clears a gate


def test_gate_of_a_lower_is_better_metric_keeps_the_low_values(store):
    """gate_metric ece, threshold 0.1: an ECE of 0.33 is refused, 0.02 registered."""
    root, uri = store
    out, _ = fake_training(root, uri, seed=9)
    gate = cfg("m-ece", gate_metric="ece", gate_threshold=0.1)
    poor = register.run(out, evaluated(out, uri, ece=0.33), split_report(), config=gate,
                        tracking_uri=uri)
    assert poor["version"] is None and "ece=0.33 is above the gate 0.1" in poor["skipped"]
    good = register.run(out, evaluated(out, uri, ece=0.02), split_report(), config=gate,
                        tracking_uri=uri)
    assert good["version"] == "1" and good["created"]


def test_gate_metrics_are_evaluate_s_headline_metrics():
    from components.common.config import GATE_METRICS, lower_is_better
    from components.evaluation.metrics import HEADLINE

    assert set(GATE_METRICS) == set(HEADLINE)
    assert [m for m in GATE_METRICS if lower_is_better(m)] == ["ece"]


@pytest.mark.parametrize("setting, key", [("gate_threshold: nan", "gate_threshold"),
                                          ("gate_threshold: .nan", "gate_threshold"),
                                          ("gate_metric: balanced_acc", "gate_metric"),
                                          ("min_delta: -5", "min_delta")])
def test_bad_gate_settings_are_refused_naming_file_and_key(tmp_path, capsys, setting, key):
    params = tmp_path / "params.yaml"
    params.write_text(f"register:\n  {setting}\n")
    assert register.main(["--train_dir", str(tmp_path), "--metrics", "m.json", "--split_report",
                          "s.json", "--params", str(params)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"register.{key} = " in err and str(params) in err


def test_metrics_of_other_weights_or_another_split_are_refused(store, tmp_path, capsys):
    root, uri = store
    out, _ = fake_training(root, uri, seed=7)
    other, _ = fake_training(root, uri, seed=8)
    with pytest.raises(register.LineageError, match="evaluate these weights first"):
        register.run(out, metrics_json(other), split_report(), config=cfg("m-lineage"),
                     tracking_uri=uri)
    with pytest.raises(register.LineageError, match="split hashes differ"):
        register.run(out, metrics_json(out), split_report("t" * 64), config=cfg("m-lineage"),
                     tracking_uri=uri)
    stale = {k: v for k, v in metrics_json(out).items() if k != "weights_digest"}
    (tmp_path / "m.json").write_text(json.dumps(stale))
    (tmp_path / "s.json").write_text(json.dumps(split_report()))
    assert register.main(["--train_dir", str(out), "--metrics", str(tmp_path / "m.json"),
                          "--split_report", str(tmp_path / "s.json"), "--tracking_uri", uri,
                          "--model_name", "m-lineage"]) == 1
    assert "re-run evaluate" in capsys.readouterr().err
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    assert registry.versions(client, "m-lineage") == []


def test_unreachable_server_fails_naming_the_uri(store):
    root, _ = store
    out, _ = fake_training(root, make_store(root), seed=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://user:hunter2@127.0.0.1:{port}"
    with pytest.raises(registry.RegistryUnavailable) as err:
        register.run(out, metrics_json(out), split_report(),
                     config=cfg("m", retries=1, backoff_s=0.01), tracking_uri=uri)
    assert f"127.0.0.1:{port}" in str(err.value) and "hunter2" not in str(err.value)


def test_retries_then_succeeds(monkeypatch):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("Connection refused")
        return "ok"

    assert registry.with_retries(flaky, "http://x", retries=3, backoff_s=0.001) == "ok"
    assert len(calls) == 3
    with pytest.raises(ValueError):  # not a connection problem: no retry
        registry.with_retries(lambda: (_ for _ in ()).throw(ValueError("bad")), "http://x", 3, 0.001)


def test_tags_carry_no_secrets():
    tags = model_card.clean_tags({"data_source": "s3://key:secretvalue@bucket/x", "aws_secret_access_key": "x",
                                "MLFLOW_TRACKING_PASSWORD": "p", "data_rev": "v1"})
    assert tags == {"data_source": "s3://***@bucket/x", "data_rev": "v1"}


def test_cli_main_reads_params(store, tmp_path, capsys):
    root, uri = store
    out, run_id = fake_training(root, uri, seed=5)
    (tmp_path / "params.yaml").write_text("register:\n  model_name: m-cli\n  gate_metric: balanced_accuracy\n"
                                          "  gate_threshold: 0.0\n")
    (tmp_path / "metrics.json").write_text(json.dumps(evaluated(out, uri, 0.4)))
    (tmp_path / "split.json").write_text(json.dumps(split_report()))
    rc = register.main(["--train_dir", str(out), "--metrics", str(tmp_path / "metrics.json"),
                        "--split_report", str(tmp_path / "split.json"), "--params",
                        str(tmp_path / "params.yaml"), "--tracking_uri", uri,
                        "--out", str(tmp_path / "registration.json")])
    assert rc == 0
    result = json.loads((tmp_path / "registration.json").read_text())
    assert result["name"] == "m-cli" and result["run_id"] == run_id
    mlflow.set_tracking_uri(uri)
    info = mlflow.pyfunc.load_model("models:/m-cli@challenger").unwrap_python_model().info
    # the preprocess size travels with the weights (the checkpoint), not through params
    assert info["prepare_size"] == PREPARE and info["img_size"] == IMG
    assert info["classes"] == list(CLASSES)


def test_run_id_source(store, registered):
    """A run id registers the serving model its training logged; a run without one is a
    clear error."""
    root, uri = store
    out, run_id, _ = registered
    again = register.run(run_id, metrics_json(out, 0.5), split_report(), config=cfg("m-reg"),
                         tracking_uri=uri)
    assert again["version"] == "1" and again["created"] is False
    fresh = register.run(run_id, metrics_json(out, 0.5), split_report(), config=cfg("m-by-run"),
                         tracking_uri=uri)
    assert fresh["version"] == "1" and fresh["created"] and fresh["run_id"] == run_id
    other_out, other = fake_training(root, uri, seed=6)
    with pytest.raises(FileNotFoundError, match="no logged `classifier` model"):
        register.run(other, metrics_json(other_out, 0.5), split_report(), config=cfg("m-reg"),
                     tracking_uri=uri)


@pytest.mark.parametrize("flag, value, says", [("--alias", "prod'env", "Invalid alias name"),
                                               ("--alias", "latest", "is reserved"),
                                               ("--model_name", "a/b", "is not usable")])
def test_bad_alias_or_model_name_is_refused_in_one_line(tmp_path, capsys, flag, value, says):
    assert register.main(["--train_dir", str(tmp_path), "--metrics", "m.json", "--split_report",
                          "s.json", flag, value, "--no_gate"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err


def test_an_edited_metrics_json_is_refused(store, tmp_path, capsys):
    """metrics.json's balanced_accuracy raised to 0.99 by hand: the run logged 0.4, so register
    refuses naming both, for a tracked training and for an untracked one (whose evaluation
    run is found by the weights' digest)."""
    root, uri = store
    out, _ = fake_training(root, uri, seed=10)
    untracked, _ = fake_training(root, uri, seed=11)
    (untracked / "training_summary.json").unlink()
    for source in (out, untracked / "ema_weights.pt"):
        edited = {**evaluated(source if source.is_dir() else untracked, uri, 0.4),
                  "balanced_accuracy": 0.99}
        (tmp_path / "metrics.json").write_text(json.dumps(edited))
        (tmp_path / "split.json").write_text(json.dumps(split_report()))
        assert register.main(["--train_dir", str(source), "--metrics", str(tmp_path / "metrics.json"),
                              "--split_report", str(tmp_path / "split.json"), "--tracking_uri", uri,
                              "--model_name", "m-edited"]) == 1
        err = capsys.readouterr().err
        assert "balanced_accuracy = 0.99 but evaluate logged 0.4" in err, err
        assert len(err.strip().splitlines()) == 1
    (tmp_path / "metrics.json").write_text(json.dumps({**edited, "balanced_accuracy": "high"}))
    assert register.main(["--train_dir", str(untracked), "--metrics", str(tmp_path / "metrics.json"),
                          "--split_report", str(tmp_path / "split.json"), "--tracking_uri", uri,
                          "--model_name", "m-edited"]) == 1
    assert capsys.readouterr().err.strip() == \
        "register: metrics.json: balanced_accuracy is not a number; re-run evaluate"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    assert registry.versions(client, "m-edited") == []
    # unedited, the untracked one registers (its evaluation record is a run of its own)
    result = register.run(untracked / "ema_weights.pt", evaluated(untracked, uri, 0.4),
                          split_report(), config=cfg("m-edited"), tracking_uri=uri)
    assert result["version"] == "1"
    assert client.get_model_version("m-edited", "1").tags["test_balanced_accuracy"] == "0.400000"


def test_an_untracked_training_registers_into_the_stores_artifact_folder(tmp_path,
                                                                         monkeypatch):
    """The run register makes for an untracked training is created in an experiment whose
    files live beside the SQLite store (mlartifacts/), not in ./mlruns of the folder register
    ran in (a DVC temporary copy, deleted after the run)."""
    root, workdir = tmp_path / "project", tmp_path / "dvc-temp-copy"
    root.mkdir()
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    out = tmp_path / "untracked"
    torch.manual_seed(0)
    model = HybridConvNeXtV2(num_classes=len(CLASSES), preset="tiny")
    checkpoint.save(out / "ema_weights.pt", {
        "model_config": model.config, "classes": list(CLASSES), "img_size": IMG,
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "prepare_size": PREPARE,
        "split_hash": SPLIT, "ema": model.state_dict(), "epoch": 1, "step": 10})
    result = register.run(out / "ema_weights.pt", evaluated(out, uri, 0.5), split_report(),
                          config=cfg("m-untracked"), tracking_uri=uri, experiment="registered")
    assert result["version"] == "1" and not (workdir / "mlruns").exists()
    location = client.get_experiment_by_name("registered").artifact_location
    assert location.startswith((root / tracking.ARTIFACTS_DIR).as_uri()), location


def test_concurrent_registers_of_one_run_make_one_version(mlflow_server, tmp_path):
    """Four real `register` processes of one run, released at once against a real server (as
    a KFP retry beside its first try): one version, every process exits 0 reporting it, and
    the alias points at it."""
    import subprocess
    import sys

    client = mlflow.MlflowClient(mlflow_server, registry_uri=mlflow_server)
    if client.get_experiment_by_name(EXPERIMENT) is None:
        client.create_experiment(EXPERIMENT)
    out, run_id = fake_training(tmp_path, mlflow_server, seed=12, log_model=True)
    evaluated(out, mlflow_server, 0.5)
    (tmp_path / "split.json").write_text(json.dumps(split_report()))
    name = f"m-concurrent-{tmp_path.name}"[:60]
    # each child imports everything, says "ready" and waits for one line on stdin: all four
    # then look for an existing version at the same moment
    child = ("import sys, mlflow; from components import register; print('ready', flush=True); "
             "sys.stdin.readline(); sys.exit(register.main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", child, "--train_dir", str(out), "--metrics",
           str(out / "eval" / "metrics.json"), "--split_report", str(tmp_path / "split.json"),
           "--tracking_uri", mlflow_server, "--model_name", name]
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outcomes = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    assert [rc for rc, _, _ in outcomes] == [0] * 4, outcomes
    reported = [json.loads(stdout) for _, stdout, _ in outcomes]
    assert {r["version"] for r in reported} == {"1"} and {r["alias"] for r in reported} == {"challenger"}
    assert [v.version for v in registry.versions(client, name)] == ["1"]
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "1"
    assert sum(r["created"] for r in reported) == 1
