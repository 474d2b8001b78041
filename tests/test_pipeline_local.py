"""`skinlesion pipeline run-local`: the KFP pipeline end to end on this machine (kfp.local
SubprocessRunner, use_venv=False, CPU) on tiny synthetic data (with two unreadable images,
skip_corrupt on) with a tiny model, MLflow in a SQLite file; KFP's evaluate gives the DVC
stage's metrics.json; and the data step's hash, which is DVC's own directory hash."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.commands.cli import main as skinlesion
from pipeline.data import dir_md5, materialise
from pipeline.publish import provenance

BIN = Path(sys.executable).parent
TASKS = ["materialise-data", "preprocess", "split", "class-weights", "train", "evaluate", "register"]
TINY = {
    "preprocess": {"size": 40, "skip_corrupt": True},
    "train": {"img_size": 32, "dims": [8, 16, 24, 32], "depths": [1, 1, 1, 1], "epochs": 1,
              "batch_size": 16, "warmup_epochs": 0, "num_workers": 0, "ema_decay": 0.9,
              "gpu_resident": "off", "self_supervised_epochs": 0},
    "evaluate": {"bootstrap": 20},
}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    from components.commands import synth

    out = tmp_path_factory.mktemp("data") / "raw"
    synth.run(out, n=160, seed=0)
    return add_unreadable_images(out)


def add_unreadable_images(raw: Path) -> Path:
    """Two labelled images a real archive might hold: a truncated JPEG and a zero-byte file."""
    images = sorted((raw / "images").glob("*.jpg"))
    images[0].write_bytes(images[0].read_bytes()[:300])
    images[1].write_bytes(b"")
    return raw



def test_data_hash_is_dvcs_directory_hash(tmp_path):
    data = tmp_path / "data" / "raw"
    (data / "images" / "sub").mkdir(parents=True)
    (data / "labels.csv").write_text("image,label\na,1\nb,2\n")
    (data / "images" / "a.jpg").write_bytes(bytes(range(256)) * 10)
    (data / "images" / "sub" / "b.jpg").write_bytes(b"\xff\xd8" + b"0" * 500)
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(BIN / "dvc"), "add", "-q", "data/raw"], cwd=tmp_path, check=True)
    recorded = yaml.safe_load((tmp_path / "data" / "raw.dvc").read_text())["outs"][0]["md5"]
    assert dir_md5(data) == recorded

    out = tmp_path / "materialised"
    info = materialise(out, local_path=str(data))
    assert info["data_hash"] == recorded and info["files"] == 3
    assert "dvc_file_md5" not in info, "the .dvc file next to the folder agrees"
    assert (out / "images" / "sub" / "b.jpg").read_bytes() == (data / "images" / "sub" / "b.jpg").read_bytes()
    assert provenance({**info, "other": 1}) == {k: info[k] for k in ("data_hash", "data_source", "data_rev")}

    (data / "labels.csv").write_text("image,label\na,1\nb,3\n")  # edited after `dvc add`
    info = materialise(out, local_path=str(data))
    assert info["data_hash"] != recorded and info["dvc_file_md5"] == recorded

    with pytest.raises(ValueError, match="local_path or repo_url"):
        materialise(tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        materialise(tmp_path / "x", local_path=str(tmp_path / "missing"))


def test_materialise_reads_data_raw_at_a_git_revision_from_the_s3_remote(tmp_path, monkeypatch):
    """The cluster path: DVCFileSystem(repo, rev, remote) with the endpoint passed in (not in
    the repo's config), credentials from the environment, moto's S3 server as the remote."""
    import shutil

    import boto3
    from s3server import FAKE_AWS_ENV, moto_s3_server

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "dvc-site-cache"))
    git_env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    for key, value in git_env.items():
        monkeypatch.setenv(key, value)
    repo = tmp_path / "repo"
    raw = repo / "data" / "raw"
    (raw / "images").mkdir(parents=True)

    def sh(*args: str) -> str:
        return subprocess.run(args, cwd=repo, check=True, text=True, capture_output=True).stdout

    with moto_s3_server() as endpoint:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="data")
        sh("git", "init", "-q")
        sh(str(BIN / "dvc"), "init", "-q")
        sh(str(BIN / "dvc"), "remote", "add", "-d", "storage", "s3://data/dvc")
        # the endpoint only in the uncommitted local config, for pushing
        sh(str(BIN / "dvc"), "remote", "modify", "--local", "storage", "endpointurl", endpoint)
        hashes = []
        for version in (1, 2):
            (raw / "labels.csv").write_text(f"image,label\nA,{version}\n")
            (raw / "images" / "A.jpg").write_bytes(bytes([version]) * 100)
            sh(str(BIN / "dvc"), "add", "-q", "data/raw")
            sh(str(BIN / "dvc"), "push", "-q")
            sh("git", "add", "-A")
            sh("git", "commit", "-qm", f"data v{version}")
            hashes.append(yaml.safe_load((repo / "data/raw.dvc").read_text())["outs"][0]["md5"])
        first = sh("git", "rev-list", "--max-parents=0", "HEAD").strip()
        shutil.rmtree(repo / ".dvc" / "cache")  # only the remote has the files now
        (repo / ".dvc" / "config.local").unlink()  # the endpoint comes from materialise's argument

        info = materialise(tmp_path / "v1", repo_url=str(repo), rev=first, endpoint_url=endpoint)
        assert info["data_hash"] == hashes[0] and "dvc_file_md5" not in info
        assert (tmp_path / "v1" / "labels.csv").read_text() == "image,label\nA,1\n"
        assert info["data_rev"] == first and info["data_source"] == f"{repo}#data/raw"
        info = materialise(tmp_path / "v2", repo_url=str(repo), rev="", endpoint_url=endpoint)
        assert info["data_hash"] == hashes[1] != hashes[0]


def _task_outputs(run_dir: Path, task: str) -> dict:
    return json.loads((run_dir / task / "executor_output.json").read_text())


@pytest.fixture(scope="module")
def pipeline_run(raw, tmp_path_factory) -> tuple[Path, Path, str]:
    """One `skinlesion pipeline run-local` of the tiny recipe: (its run folder, the folder it
    ran in, its MLflow URI)."""
    tmp = tmp_path_factory.mktemp("run_local")
    override = tmp / "tiny.yaml"
    override.write_text(yaml.safe_dump(TINY))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    root = tmp / "kfp"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # MLflow's ./mlruns artifacts land here
        assert skinlesion(["pipeline", "run-local", "--data", str(raw), "--pipeline_root",
                           str(root), "--params_file", str(override),
                           "-S", f"mlflow_tracking_uri={uri}"]) == 0
    (run_dir,) = [p for p in root.iterdir() if p.name.startswith("skin-lesion-")]
    return run_dir, tmp, uri


@pytest.mark.slow
def test_run_local_end_to_end_on_cpu(raw, pipeline_run):
    import mlflow
    from mlflow import MlflowClient

    from components import evaluate

    run_dir, tmp_path, uri = pipeline_run
    override = tmp_path / "tiny.yaml"
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == sorted(TASKS)

    # the step outputs, where the next steps read them
    assert (run_dir / "materialise-data/raw/labels.csv").is_file()
    prepared = run_dir / "preprocess/prepared"
    assert (prepared / "manifest.csv").is_file()
    splits = run_dir / "split/splits"
    assert {p.name for p in splits.iterdir()} >= {"train.csv", "val.csv", "test.csv",
                                                  "split_report.json"}
    # skip_corrupt: both unreadable images are reported, and no split holds them
    report = json.loads((prepared / "preprocess_report.json").read_text())
    assert sorted(c["image"] for c in report["corrupt"]) == _unreadable(raw)
    split_images = "".join((splits / f"{n}.csv").read_text() for n in ("train", "val", "test"))
    assert not any(i in split_images for i in _unreadable(raw))
    assert json.loads((run_dir / "class-weights/weights").read_text())["classes"][0] == "MEL"
    assert (run_dir / "train/model/ema_weights.pt").is_file()
    summary = json.loads((run_dir / "train/model/training_summary.json").read_text())
    assert summary["completed"] and summary["epochs"] == 1
    metrics = json.loads((run_dir / "evaluate/evaluation/metrics.json").read_text())
    assert metrics["n_images"] > 0 and "raw" in metrics  # the training folder: EMA and raw

    # the data hash travels in every artifact's metadata
    data_hash = dir_md5(raw)
    materialised = _task_outputs(run_dir, "materialise-data")
    assert materialised["parameterValues"]["Output"] == data_hash
    for task in TASKS:
        for name, artifacts in _task_outputs(run_dir, task)["artifacts"].items():
            for artifact in artifacts["artifacts"]:
                assert artifact["metadata"]["data_hash"] == data_hash, f"{task}.{name}"
                assert artifact["metadata"]["data_source"] == str(raw.resolve())
    assert _task_outputs(run_dir, "preprocess")["artifacts"]["prepared"]["artifacts"][0][
        "metadata"]["corrupt"] == 2

    # evaluate's KFP metrics: scalars and a confusion matrix over the eight classes
    kfp_eval = _task_outputs(run_dir, "evaluate")
    scalars = kfp_eval["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert scalars["balanced_accuracy"] == pytest.approx(metrics["balanced_accuracy"])
    matrix = kfp_eval["artifacts"]["classification"]["artifacts"][0]["metadata"]["confusionMatrix"]
    assert len(matrix["rows"]) == 8
    assert sum(sum(row["row"]) for row in matrix["rows"]) == metrics["n_images"]

    # one implementation: the DVC stage's command on the same trained model gives the same file
    params = tmp_path / "params.yaml"
    params.write_text((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    assert evaluate.main(["--params", str(params), "--params_file", str(override), "--model",
                          str(run_dir / "train/model"), "--test_csv", str(splits / "test.csv"),
                          "--img_dir", str(prepared / "images"), "--out", str(tmp_path / "dvc"),
                          "--no_mlflow"]) == 0
    assert json.loads((tmp_path / "dvc/metrics.json").read_text()) == metrics

    # past the gate: a registered model version with alias challenger and the data's hash
    registration = json.loads((run_dir / "register/registration").read_text())
    assert registration["alias"] == "challenger"
    assert _task_outputs(run_dir, "register")["parameterValues"]["Output"] == registration["version"]
    client = MlflowClient(uri, registry_uri=uri)  # not a registry URI set by an earlier test
    version = client.get_model_version_by_alias(registration["name"], "challenger")
    assert str(version.version) == registration["version"]
    assert version.tags["data_hash"] == data_hash
    assert version.tags["data_source"] == str(raw.resolve())
    mlflow.set_tracking_uri(None)


def _unreadable(raw: Path) -> list[str]:
    return [p.stem for p in sorted((raw / "images").glob("*.jpg"))[:2]]


@pytest.mark.slow
def test_the_register_component_applies_the_gate(pipeline_run, tmp_path, monkeypatch):
    """The register component alone in kfp.local, on the end-to-end run's artifacts brought in
    with dsl.importer (a whole second pipeline run would only retrain the same model): a gate
    above 1 refuses, and the component returns no version."""
    from kfp import dsl, local

    from components.common.config import RegisterConfig
    from pipeline import kfp_components as c

    run_dir = pipeline_run[0]
    monkeypatch.chdir(tmp_path)
    model_metadata = _task_outputs(run_dir, "train")["artifacts"]["model"]["artifacts"][0][
        "metadata"]

    @dsl.pipeline
    def register_only():
        model = dsl.importer(artifact_uri=str(run_dir / "train/model"), artifact_class=dsl.Model,
                             metadata=model_metadata)
        evaluation = dsl.importer(artifact_uri=str(run_dir / "evaluate/evaluation"),
                                  artifact_class=dsl.Artifact)
        splits = dsl.importer(artifact_uri=str(run_dir / "split/splits"),
                              artifact_class=dsl.Dataset)
        c.register(model=model.output, evaluation=evaluation.output, splits=splits.output,
                   register_params={**RegisterConfig().as_dict(), "gate_threshold": 1.01},
                   mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")

    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str(tmp_path / "kfp"), raise_on_error=True)
    register_only()
    (gate_run,) = (tmp_path / "kfp").glob("register-only-*")
    registration = json.loads((gate_run / "register/registration").read_text())
    assert registration["version"] is None and "below the gate 1.01" in registration["skipped"]
    assert _task_outputs(gate_run, "register")["parameterValues"]["Output"] == ""
