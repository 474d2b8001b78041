"""pipeline/publish.py: what a KFP task hands on around a step's run() (the artifacts'
provenance, the train step's Model and Metrics artifacts), on real kfp.dsl artifact objects."""
from __future__ import annotations

from kfp.dsl import Dataset, Metrics, Model

from components.common.config import TrainConfig
from pipeline.publish import PROVENANCE_KEYS, provenance, publish_training

RAW = {"data_hash": "0f" * 16 + ".dir", "data_source": "https://git.example.org/x#data/raw",
       "data_rev": "v1", "files": 42}


def test_provenance_keeps_only_the_datas_origin():
    assert provenance(RAW) == {k: RAW[k] for k in PROVENANCE_KEYS}
    assert provenance({"files": 1}) == {}


def test_publish_training_fills_the_model_and_metrics_artifacts(tmp_path):
    prepared = Dataset(name="prepared", uri=str(tmp_path / "prepared"), metadata=dict(RAW))
    splits = Dataset(name="splits", uri=str(tmp_path / "splits"), metadata={"split_hash": "ab12"})
    model = Model(name="model", uri=str(tmp_path / "model"), metadata={})
    metrics = Metrics(name="train_metrics", uri=str(tmp_path / "m"), metadata={})
    summary = {"epochs": 3, "steps": 30, "best_epoch": 2, "seconds": 12.5, "completed": True,
               "mlflow_run_id": "r1", "paths": {"mlflow_model_uri": "models:/m-1"},
               "best": {"epoch": 2, "val_balanced_accuracy": 0.5},
               "final": {"epoch": 3, "val_loss": 1.25, "note": "not a number"}, "test": None}
    publish_training(model, metrics, summary, prepared, splits, TrainConfig(nodes=2))

    for artifact in (model, metrics):
        assert artifact.metadata["data_hash"] == RAW["data_hash"] and "files" not in artifact.metadata
        assert artifact.metadata["split_hash"] == "ab12"
    assert model.metadata["mlflow_run_id"] == "r1" and model.metadata["nodes"] == 2
    assert model.metadata["mlflow_model_uri"] == "models:/m-1"
    logged = {k: v for k, v in metrics.metadata.items() if k not in (*PROVENANCE_KEYS, "split_hash")}
    assert logged == {"epochs": 3.0, "steps": 30.0, "best_epoch": 2.0, "seconds": 12.5,
                      "best_val_balanced_accuracy": 0.5, "final_val_loss": 1.25}
