"""Scale-out on Kubeflow Trainer without a cluster:
- the TrainJob the Kubeflow SDK submits, field by field, against a stubbed Kubernetes API
  (the SDK's calls into the `kubernetes` client are answered by a stub: nothing runs);
- the job's own command run here as the torch-distributed runtime runs it (torchrun with the
  PET_* variables it injects, 2 gloo processes on the CPU), handed on like the pipeline does;
- a resumed 2-process run equal to an uninterrupted one;
- the compiled pipeline with train.nodes = 2 has the TrainJob step; the default one has not."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from components.common.config import load_params
from components.training import checkpoint
from pipeline import trainjob
from procs import free_port, run_group
from tiny_data import TINY, make_splits

ROOT = Path(__file__).resolve().parents[1]
TORCH_RUNTIME = {  # the torch-distributed ClusterTrainingRuntime as Trainer v2.3.0 installs it
    "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "ClusterTrainingRuntime",
    "metadata": {"name": "torch-distributed",
                 "labels": {"trainer.kubeflow.org/framework": "torch"}},
    "spec": {"mlPolicy": {"numNodes": 1, "torch": {}}, "template": {"spec": {"replicatedJobs": [
        {"name": "node", "template": {"metadata": {"labels": {
            "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
            "spec": {"template": {"spec": {"containers": [
                {"name": "node", "image": "pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime"}]}}}}}]}}},
}


class StubbedKubernetesApi:
    """Answers the calls the SDK makes through `kubernetes.client` and records the TrainJob."""

    def __init__(self):
        self.created = []

    def patches(self):
        from kubernetes import client

        stub = self

        class _Async:
            def __init__(self, value):
                self.value = value

            def get(self, timeout=None):
                return self.value

        def create(api, group, version, namespace, plural, body, **kw):
            stub.created.append({"group": group, "version": version, "namespace": namespace,
                                 "plural": plural, "body": body})
            return body

        def namespaced(api, group, version, namespace, plural, name, **kw):
            raise client.ApiException(status=404)  # no namespaced runtime: the cluster one

        def cluster(api, group, version, plural, name, **kw):
            assert (plural, name) == ("clustertrainingruntimes", "torch-distributed")
            return _Async(TORCH_RUNTIME) if kw.get("async_req") else TORCH_RUNTIME

        return [mock.patch.object(client.CustomObjectsApi, "create_namespaced_custom_object", create),
                mock.patch.object(client.CustomObjectsApi, "get_namespaced_custom_object", namespaced),
                mock.patch.object(client.CustomObjectsApi, "get_cluster_custom_object", cluster),
                mock.patch.object(client.CoreV1Api, "read_namespaced_config_map",
                                  side_effect=client.ApiException(status=404))]


def _request(**overrides) -> trainjob.TrainJobRequest:
    return trainjob.TrainJobRequest(**{
        "image": "registry.example.org/skinlesion:0.1.0", "nodes": 2, "gpus_per_node": 4,
        "train_args": ["--params", "/work/runs/r1/params.yaml", "--out_dir", "/work/runs/r1/train"],
        "pvc": "skinlesion-work", "cpu": "8", "memory": "32Gi", "name": "skinlesion-r1",
        "namespace": "ml",
        "env": {"MLFLOW_TRACKING_URI": "http://mlflow.mlflow:5000"},
        "secrets": trainjob.SECRETS, **overrides})


def test_trainjob_spec_field_by_field_against_a_stubbed_kubernetes_api():
    from kubeflow.trainer import KubernetesBackendConfig, TrainerClient
    from kubernetes import client

    api = StubbedKubernetesApi()
    patches = api.patches()
    for p in patches:
        p.start()
    try:
        trainer_client = TrainerClient(KubernetesBackendConfig(
            namespace="ml", client_configuration=client.Configuration()))
        name = trainjob.submit(_request(), trainer_client)
    finally:
        for p in patches:
            p.stop()
    [call] = api.created
    assert (call["group"], call["version"], call["namespace"], call["plural"]) == (
        "trainer.kubeflow.org", "v1alpha1", "ml", "trainjobs")
    job = call["body"]
    assert job["kind"] == "TrainJob" and job["metadata"]["name"] == name == "skinlesion-r1"
    spec = job["spec"]
    assert spec["runtimeRef"] == {"kind": "ClusterTrainingRuntime", "name": "torch-distributed"}
    t = spec["trainer"]
    assert t["image"] == "registry.example.org/skinlesion:0.1.0" and t["numNodes"] == 2
    assert t["command"] == ["torchrun"]
    assert t["args"] == ["--nproc-per-node=4", "-m", "components.train", "--params",
                         "/work/runs/r1/params.yaml", "--out_dir", "/work/runs/r1/train"]
    for kind in ("requests", "limits"):
        assert t["resourcesPerNode"][kind] == {"nvidia.com/gpu": "4", "cpu": "8", "memory": "32Gi"}
    env = {e["name"]: e["value"] for e in t["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.mlflow:5000"
    assert not any(k.startswith("PET_") for k in env), "the runtime injects those itself"
    [patch] = spec["runtimePatches"]
    [node] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    assert node["name"] == "node"
    assert pod["volumes"] == [{"name": "work", "persistentVolumeClaim": {"claimName": "skinlesion-work"}}]
    [container] = pod["containers"]
    assert container["name"] == "node"
    assert container["volumeMounts"] == [{"name": "work", "mountPath": "/work"}]
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert secrets["AWS_SECRET_ACCESS_KEY"] == {"name": "skinlesion-s3",
                                                "key": "AWS_SECRET_ACCESS_KEY", "optional": True}
    assert set(secrets) == set(trainjob.SECRETS)
    assert all("value" not in e for e in container["env"]), \
        "credentials come from secrets, never as values in the spec"


def _train_args(data: dict, out: Path, *extra: str) -> list[str]:
    return ["--train_csv", str(data["train"]), "--val_csv", str(data["val"]),
            "--img_dir", str(data["img_dir"]), "--out_dir", str(out), *TINY,
            "--batch_size", "4", "--epochs", "3", "--warmup_epochs", "0", "--num_workers", "0",
            "--gpu_resident", "off", "--no_mlflow", "--nodes", "1", "--gpus_per_node", "2",
            *extra]


def _as_the_runtime_runs_it(request: trainjob.TrainJobRequest, timeout: int = 600):
    """The node's container command, with the PET_* variables the torch-distributed runtime
    injects for one node (node rank 0, master = this host)."""
    command, args = request.command()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PET_NNODES": "1", "PET_NODE_RANK": "0",
           "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(free_port())}
    torchrun = [sys.executable, "-m", "torch.distributed.run"] if command == ["torchrun"] else command
    done = run_group([*torchrun, *args], timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_splits(tmp_path_factory.mktemp("ddp-data"))


@pytest.mark.slow
def test_the_jobs_command_trains_with_two_processes_resumes_exactly_and_is_handed_on(data,
                                                                                      tmp_path):
    out, model = tmp_path / "work" / "train", tmp_path / "model"
    request = _request(nodes=1, gpus_per_node=2, train_args=_train_args(data, out))
    done = _as_the_runtime_runs_it(request)
    assert done.stdout.count("epoch 3/3") == 1, "only rank 0 reports"
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["completed"] and summary["epochs"] == 3
    assert checkpoint.load(out / "checkpoint_last.pt")["train_config"]["world_size"] == 2
    trainjob.collect_outputs(out, model)  # what the pipeline step hands to evaluate
    assert sorted(p.name for p in model.iterdir()) == sorted(
        p.name for p in out.iterdir() if p.is_file() and not p.name.startswith("."))
    a = checkpoint.load(out / "ema_weights.pt")["ema"]
    b = checkpoint.load(model / "ema_weights.pt")["ema"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # --resume auto: a retried step continues the same, finished run instead of redoing it
    again = _as_the_runtime_runs_it(_request(nodes=1, gpus_per_node=2,
                                             train_args=_train_args(data, out, "--resume", "auto")))
    assert "resuming" in again.stdout and "(epoch 3)" in again.stdout

    # a preempted job, resubmitted, ends on the uninterrupted run's weights
    parts = tmp_path / "parts"
    _as_the_runtime_runs_it(_request(train_args=_train_args(data, parts, "--stop_after_epoch", "1"),
                                     gpus_per_node=2))
    _as_the_runtime_runs_it(_request(train_args=_train_args(data, parts, "--resume", "auto"),
                                     gpus_per_node=2))
    a = checkpoint.load(out / "checkpoint_last.pt")
    b = checkpoint.load(parts / "checkpoint_last.pt")
    assert a["epoch"] == b["epoch"] == 3
    assert max((a["ema"][k].float() - b["ema"][k].float()).abs().max().item()
               for k in a["ema"]) < 1e-6


def test_train_points_to_train_job_which_refuses_credentials_in_a_url(data, tmp_path, capsys,
                                                                     monkeypatch):
    from components import train
    from components.commands.cli import main as skinlesion

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    flags = _train_args(data, tmp_path / "o")[:-4] + ["--nodes", "2"]
    assert train.main(flags) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "skinlesion pipeline train-job --image IMAGE --pvc PVC" in line and "torchrun" in line
    with pytest.raises(SystemExit):  # no cluster target: argparse names the missing flags
        skinlesion(["pipeline", "train-job", *flags])
    assert "--image, --pvc" in capsys.readouterr().err
    # a password in the tracking URI would be written into the TrainJob's spec: refused
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret@mlflow.example.org:5000")
    assert skinlesion(["pipeline", "train-job", "--image", "registry.example.org/x:1",
                       "--pvc", "work", *flags]) == 1
    err = capsys.readouterr().err
    assert "MLFLOW_TRACKING_URI = http://***@mlflow.example.org:5000 carries credentials" in err
    assert "s3cret" not in err and "alice" not in err


@pytest.fixture
def submitted(monkeypatch) -> list:
    """The requests `skinlesion pipeline train-job` hands to the Kubeflow SDK (no cluster
    here: submit_and_wait is replaced by a recorder)."""
    requests = []
    monkeypatch.setattr(trainjob, "submit_and_wait", requests.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return requests


def test_train_job_runs_the_train_flags_on_every_node_cluster_faked(data, tmp_path, submitted,
                                                                    monkeypatch):
    from components.commands.cli import main as skinlesion

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.mlflow:5000")
    flags = [*_train_args(data, tmp_path / "o")[:-4], "--gpus_per_node", "4", "--nodes", "2",
             "--params", str(ROOT / "params.yaml")]
    with pytest.raises(SystemExit):  # a flag the nodes would refuse stops it here
        skinlesion(["pipeline", "train-job", "--image", "x", "--pvc", "work", *flags, "--epochz", "2"])
    assert submitted == []
    assert skinlesion(["pipeline", "train-job", "--image", "registry.example.org/x:1",
                       "--pvc", "work", "--namespace", "ml", *flags]) == 0
    [req] = submitted
    assert req.train_args == flags, "the nodes get the train flags as given"
    assert (req.image, req.pvc, req.namespace, req.nodes, req.gpus_per_node) == (
        "registry.example.org/x:1", "work", "ml", 2, 4)
    node = load_params(ROOT / "params.yaml")["kubeflow"]["resources"]["train"]
    assert (req.cpu, req.memory) == (str(node["cpu"]), str(node["memory"]))
    assert req.env["MLFLOW_TRACKING_URI"] == "http://mlflow.mlflow:5000"
    assert req.secrets == trainjob.SECRETS
    assert req.command()[1][:3] == ["--nproc-per-node=4", "-m", "components.train"]


def test_params_edited_during_a_train_job_fail_the_command_cluster_faked(
        data, tmp_path, monkeypatch, capsys):
    """The command submits a TrainJob and waits (no cluster here: the submission is replaced
    by a params.yaml edit meanwhile); the nodes read no file of this machine, so only the
    submitting process can see the edit."""
    from components.commands.cli import main as skinlesion

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"nodes": 2, "peak_lr": 0.01}}))

    def submitted_while_params_edited(request):
        params.write_text(yaml.safe_dump({"train": {"nodes": 2, "peak_lr": 0.02}}))

    monkeypatch.setattr(trainjob, "submit_and_wait", submitted_while_params_edited)
    assert skinlesion(["pipeline", "train-job", "--image", "x", "--pvc", "work",
                       *_train_args(data, tmp_path / "out")[:-4], "--params", str(params)]) == 1
    assert "train.peak_lr (0.01 -> 0.02)" in capsys.readouterr().err


def test_compiled_pipeline_with_two_nodes_submits_a_trainjob(tmp_path):
    from kfp import compiler

    from pipeline.pipeline import build_pipeline

    def compiled(params: dict) -> tuple[dict, dict]:
        path = tmp_path / "p.yaml"
        compiler.Compiler().compile(build_pipeline(params, "registry.example.org/x:1"), str(path))
        spec, platform = yaml.safe_load_all(path.read_text())
        return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]

    params = load_params(ROOT / "params.yaml")
    default_spec, _ = compiled(params)
    assert "exec-train" in default_spec["deploymentSpec"]["executors"]
    assert "exec-train-distributed" not in default_spec["deploymentSpec"]["executors"]

    params["train"]["nodes"] = 2
    spec, k8s = compiled(params)
    executors = spec["deploymentSpec"]["executors"]
    assert "exec-train" not in executors and "exec-train-distributed" in executors
    source = "\n".join(executors["exec-train-distributed"]["container"]["command"])
    assert "trainjob.submit(request, client)" in source and "trainjob.collect_outputs" in source
    assert "accelerator" not in executors["exec-train-distributed"]["container"]["resources"]
    mounts = k8s["exec-train-distributed"]["pvcMount"]
    assert mounts[0]["mountPath"] == trainjob.MOUNT
    task = spec["root"]["dag"]["tasks"]["train-distributed"]
    # each node gets the train task's resources from params.yaml
    assert task["inputs"]["parameters"]["node_resources"]["runtimeValue"]["constant"] == \
        {"cpu": "8", "memory": "32Gi"}
    assert task["inputs"]["parameters"]["image"]["runtimeValue"]["constant"] == \
        "registry.example.org/x:1"
    assert set(spec["root"]["dag"]["tasks"]["evaluate"]["dependentTasks"]) >= {"train-distributed"}
