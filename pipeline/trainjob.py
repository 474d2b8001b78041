"""Multi-GPU and multi-node training on Kubeflow Trainer: the same `components.train` entry
point, under the torch-distributed runtime, as a TrainJob submitted with the Kubeflow SDK
(package `kubeflow`, `TrainerClient`), by the pipeline's train_distributed task or by
`skinlesion pipeline train-job` (pipeline/cli.py).

What runs: `torchrun --nproc-per-node=G -m components.train --params <run>/params.yaml ...` on
each of N nodes (pods) of the project's image. The runtime injects the PET_* variables
(nnodes, node rank, master address and port) that torchrun reads; components.train then trains
with DDP (nccl), rank 0 validating, checkpointing, keeping the EMA weights and logging the one
MLflow run. How it scales, per process unless said otherwise:

- batch_size is per process: the effective batch is nodes x gpus_per_node x batch_size, and
  with lr_scaling "linear" (Goyal et al. 2017) the learning rate is world size x peak_lr,
  after the same warm-up;
- the weighted sampler draws one global sequence per epoch from (seed, epoch) and each rank
  keeps every world-size-th index (samplers.DistributedWeightedSampler): each rank reads
  1/world size of an epoch;
- rank 0 alone updates the EMA, validates and writes checkpoints and MLflow.

Data and outputs live on a volume every node mounts (a ReadWriteMany PVC at MOUNT): the
pipeline step copies its input artifacts there, the job writes its output folder there (so a
preempted job resumes from its checkpoint: `--resume auto`), and the step copies the result
into its Model artifact, the same files as the single-pod path.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from components.common import tracking
from components.common.config import ConfigError, TrainConfig, task_resources

RUNTIME = "torch-distributed"
NODE = "node"                  # the runtime's replicated job and container name
MOUNT = "/work"                # where the shared volume is mounted in every pod
TIMEOUT_S = 7 * 24 * 3600      # waiting for a long training
POLL_S = 30


@dataclass
class TrainJobRequest:
    """One distributed training: what the TrainJob runs and where."""
    image: str
    nodes: int
    gpus_per_node: int
    train_args: list[str]                     # components.train flags, paths as the pods see them
    pvc: str                                  # the shared ReadWriteMany volume
    cpu: str                                  # per node (kubeflow.resources.train)
    memory: str
    name: str | None = None
    namespace: str | None = None              # default: the pod's, or the kubeconfig's
    mount: str = MOUNT
    env: dict[str, str] = field(default_factory=dict)
    # env name -> (secret name, key): credentials from Kubernetes secrets, never in the spec
    secrets: dict[str, tuple[str, str]] = field(default_factory=dict)

    def __post_init__(self):
        # A user:password in a URL would sit in the TrainJob's spec for anyone who can read it.
        for key, value in self.env.items():
            parts = urlsplit(value)
            if parts.username is not None or parts.password is not None:
                raise ConfigError(f"{key} = {tracking.redact(value)} carries credentials, which "
                                 f"would be written into the TrainJob's spec: give the URL "
                                 f"without them, and the credentials through the secrets "
                                 f"({', '.join(sorted(self.secrets)) or 'none given'})")

    def command(self) -> tuple[list[str], list[str]]:
        """(command, args) of each node's container."""
        return (["torchrun"], [f"--nproc-per-node={self.gpus_per_node}", "-m",
                               "components.train", *self.train_args])


def trainer_and_options(req: TrainJobRequest) -> tuple:
    """The SDK's CustomTrainerContainer and the options (name, command, volume, secrets)."""
    from kubeflow.trainer import CustomTrainerContainer
    from kubeflow.trainer.options import (ContainerPatch, JobSetSpecPatch, JobSetTemplatePatch,
                                          JobSpecPatch, JobTemplatePatch, Labels, Name,
                                          PodSpecPatch, PodTemplatePatch, ReplicatedJobPatch,
                                          RuntimePatch, TrainerArgs, TrainerCommand,
                                          TrainingRuntimeSpecPatch)

    resources = {"cpu": req.cpu, "memory": req.memory}
    if req.gpus_per_node:
        resources["gpu"] = str(req.gpus_per_node)
    trainer = CustomTrainerContainer(image=req.image, num_nodes=req.nodes,
                                     resources_per_node=resources,
                                     env={"PYTHONUNBUFFERED": "1", **req.env})
    # optional: an MLflow server without authentication has no secret
    secret_env = [{"name": env, "valueFrom": {"secretKeyRef": {"name": name, "key": key,
                                                               "optional": True}}}
                  for env, (name, key) in sorted(req.secrets.items())]
    pod = PodSpecPatch(
        volumes=[{"name": "work", "persistentVolumeClaim": {"claimName": req.pvc}}],
        containers=[ContainerPatch(name=NODE, env=secret_env or None,
                                   volume_mounts=[{"name": "work", "mountPath": req.mount}])])
    patch = RuntimePatch(training_runtime_spec=TrainingRuntimeSpecPatch(
        template=JobSetTemplatePatch(spec=JobSetSpecPatch(replicated_jobs=[ReplicatedJobPatch(
            name=NODE, template=JobTemplatePatch(spec=JobSpecPatch(
                template=PodTemplatePatch(spec=pod))))]))))
    command, args = req.command()
    options = [Labels({"app.kubernetes.io/part-of": "skinlesion"}), TrainerCommand(command),
               TrainerArgs(args), patch]
    if req.name:
        options.insert(0, Name(req.name))
    return trainer, options


def client_for(namespace: str | None = None):
    """A TrainerClient: in-cluster config inside a pod, the kubeconfig on a laptop."""
    from kubeflow.trainer import KubernetesBackendConfig, TrainerClient

    return TrainerClient(KubernetesBackendConfig(namespace=namespace))


def submit(req: TrainJobRequest, client=None) -> str:
    """Create the TrainJob; returns its name."""
    client = client or client_for(req.namespace)
    trainer, options = trainer_and_options(req)
    return client.train(runtime=RUNTIME, trainer=trainer, options=options)


def wait(client, name: str, timeout_s: int = TIMEOUT_S) -> None:
    """Wait for the job to complete, then print rank 0's log; RuntimeError when it failed."""
    try:
        client.wait_for_job_status(name, status={"Complete"}, timeout=timeout_s,
                                   polling_interval=POLL_S)
    finally:
        for line in client.get_job_logs(name, step=f"{NODE}-0"):
            print(line, end="" if line.endswith("\n") else "\n")


def stage_inputs(run_dir: Path, prepared: Path, splits: Path, class_weights: Path,
                 train_section: dict) -> dict[str, Path]:
    """Copy the step's inputs onto the shared volume (what every node reads); idempotent, so a
    retried step finds them there. Returns the paths the job is given."""
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {"images": run_dir / "prepared" / "images", "splits": run_dir / "splits",
             "class_weights": run_dir / "class_weights.json", "params": run_dir / "params.yaml",
             "out_dir": run_dir / "train"}
    if not paths["images"].is_dir():
        shutil.copytree(prepared / "images", paths["images"].with_suffix(".partial"))
        paths["images"].with_suffix(".partial").rename(paths["images"])
    shutil.copytree(splits, paths["splits"], dirs_exist_ok=True)
    shutil.copy(class_weights, paths["class_weights"])
    paths["params"].write_text(yaml.safe_dump({"train": train_section}))
    return paths


def train_args(paths: dict[str, Path], experiment: str) -> list[str]:
    """components.train's flags for the staged inputs (outputs resume on a retry)."""
    return ["--params", str(paths["params"]),
            "--train_csv", str(paths["splits"] / "train.csv"),
            "--val_csv", str(paths["splits"] / "val.csv"),
            "--img_dir", str(paths["images"]), "--class_weights", str(paths["class_weights"]),
            "--out_dir", str(paths["out_dir"]), "--resume", "auto", "--experiment", experiment]


def collect_outputs(out_dir: Path, model_dir: Path) -> None:
    """The job's output folder into the step's Model artifact: the files the single-pod
    training writes there (checkpoints, EMA weights, summary)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    for path in out_dir.iterdir():
        if path.is_file() and not path.name.startswith("."):
            shutil.copy2(path, model_dir / path.name)


def job_name(prefix: str = "skinlesion-train") -> str:
    """A TrainJob name (lowercase, <= 63 characters, unique enough per second)."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}".lower()[:63]


# Credentials come from Kubernetes secrets: the secrets' default names (pipeline parameters)
# and the keys each holds, which are also the environment variables they become.
S3_SECRET, MLFLOW_SECRET = "skinlesion-s3", "skinlesion-mlflow"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def secrets(s3_secret: str = S3_SECRET, mlflow_secret: str = MLFLOW_SECRET) -> dict:
    """{environment variable: (secret name, key)} of the credentials the nodes read."""
    return {**{key: (s3_secret, key) for key in S3_SECRET_KEYS},
            **{key: (mlflow_secret, key) for key in MLFLOW_SECRET_KEYS}}


SECRETS = secrets()
# Settings handed to the nodes as plain environment variables when set here
PASSED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_S3_ENDPOINT_URL",
              "AWS_ENDPOINT_URL")


def command_request(image: str, pvc: str, namespace: str | None, train_flags: list[str],
                    cfg: TrainConfig, params: dict) -> TrainJobRequest:
    """The TrainJob of `skinlesion pipeline train-job`: every node runs the train flags as
    given (paths as the pods see them), with `cfg`'s node layout and the train task's CPU and
    memory (kubeflow.resources.train)."""
    node = task_resources(params)["train"]
    return TrainJobRequest(
        image=image, nodes=cfg.nodes, gpus_per_node=cfg.gpus_per_node,
        train_args=list(train_flags), pvc=pvc, namespace=namespace,
        cpu=str(node["cpu"]), memory=str(node["memory"]), name=job_name(), secrets=SECRETS,
        env={k: os.environ[k] for k in PASSED_ENV if os.environ.get(k)})


def submit_and_wait(req: TrainJobRequest) -> None:
    """Submit, say so, wait for the job, print rank 0's log (RuntimeError when it failed)."""
    client = client_for(req.namespace)
    name = submit(req, client)
    print(f"submitted TrainJob {name}: {req.nodes} node(s) x {req.gpus_per_node} GPU(s) of "
          f"{req.image}", file=sys.stderr, flush=True)
    wait(client, name)
