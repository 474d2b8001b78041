"""`torchrun` DDP on the CPU (gloo): two ranks, one MLflow run, one set of checkpoints."""
from __future__ import annotations

import json
import os
import sys

import pytest
from mlflow.tracking import MlflowClient

from components.training import checkpoint
from procs import run_group
from tiny_data import TINY, make_splits


@pytest.mark.slow
def test_two_process_gloo_ddp_trains_one_epoch(tmp_path, mlflow_server):
    data = make_splits(tmp_path / "data")
    out = tmp_path / "out"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "components.train",
           "--train_csv", str(data["train"]), "--val_csv", str(data["val"]),
           "--img_dir", str(data["img_dir"]), "--out_dir", str(out), *TINY,
           "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0",
           "--self_supervised_epochs", "2"]  # the default warm start, sharded over the ranks
    done = run_group(cmd, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    summary = json.loads((out / "training_summary.json").read_text())
    # 32 images, 2 ranks x 16, batch 4: 4 optimizer steps, each on 8 images.
    assert summary["steps"] == 4 and summary["epochs"] == 1
    assert summary["final"]["train_img_per_s"] > 0
    assert sorted(p.name for p in out.glob("*.pt")) == [
        "checkpoint_best.pt", "checkpoint_last.pt", "ema_weights.pt"]
    assert checkpoint.load(out / "checkpoint_last.pt")["train_config"]["world_size"] == 2

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("skin-lesion").experiment_id],
                              filter_string="tags.world_size = '2'")
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]
    assert len(client.get_metric_history(runs[0].info.run_id, "train_loss")) == 1
    assert done.stdout.count("epoch 1/1") == 1, "only rank 0 reports"
    assert done.stdout.count("self-supervised epoch 2/2") == 1
    backbone, = out.glob("self_supervised/*/backbone.safetensors")
    assert checkpoint.load(out / "checkpoint_last.pt")["train_config"]["warm_start"] == str(backbone)

