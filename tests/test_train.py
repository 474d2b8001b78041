"""The training step on tiny CPU data: CLI, outputs, overfit sanity check, refusals, settings,
transforms, samplers and class weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from components import checkpoint, train
from components.labels import CLASSES
from components.samplers import DistributedWeightedSampler, make_sampler
from components.transforms import eval_transform, train_transform
from tiny_data import TINY, make_images, make_splits

ROOT = Path(__file__).resolve().parents[1]
FAST = [*TINY, "--batch_size", "8", "--warmup_epochs", "1", "--num_workers", "0", "--no-mlflow"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return make_splits(tmp_path_factory.mktemp("tiny"))


def _args(data, out, *extra) -> list[str]:
    return ["--train_csv", str(data["train"]), "--img_dir", str(data["img_dir"]),
            "--out_dir", str(out), *FAST, *extra]


def test_train_writes_checkpoints_summary_and_a_loadable_model(data, tmp_path):
    out = tmp_path / "out"
    assert train.main(_args(data, out, "--epochs", "2", "--val_csv", str(data["val"]),
                            "--test_csv", str(data["test"]))) == 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["completed"] and summary["epochs"] == 2 and summary["steps"] == 8
    assert summary["best_epoch"] in (1, 2) and summary["mlflow_run_id"] is None
    assert set(summary["test"]) == {"test_ema_accuracy", "test_ema_balanced_accuracy",
                                    "test_ema_macro_f1"}
    for name in ("checkpoint_last.pt", "checkpoint_best.pt", "ema_weights.pt"):
        assert (out / name).is_file()

    ckpt = checkpoint.load(out / "checkpoint_last.pt")  # weights_only=True inside
    assert {"model", "ema", "optimizer", "scheduler", "scaler", "rng", "sampler", "epoch",
            "step", "mlflow_run_id", "model_config", "classes", "img_size", "mean",
            "std"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["classes"] == list(CLASSES)
    for path, which in ((out / "ema_weights.pt", "ema"), (out / "checkpoint_best.pt", "model")):
        model, meta = checkpoint.load_model(path, which=which)
        assert not model.training and meta["img_size"] == 32
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, len(CLASSES))


def test_without_val_csv_no_validation_is_claimed(data, tmp_path):
    summary = train.run(data["train"], data["img_dir"], tmp_path / "out", mlflow=False,
                        config=_tiny_config(epochs=1))
    assert summary["best"] is None and summary["paths"]["checkpoint_best"] is None
    assert not any(k.startswith("val") for k in summary["final"])
    assert not (tmp_path / "out" / "checkpoint_best.pt").exists()


def test_overfit_mode_memorises_32_images(data, tmp_path):
    out = tmp_path / "out"
    assert train.main(_args(data, out, "--epochs", "10", "--overfit_mode",
                            "--overfit_n", "32")) == 0
    final = json.loads((out / "training_summary.json").read_text())["final"]
    assert final["val_accuracy"] == 1.0 and final["val_ema_accuracy"] == 1.0


def test_refuses_to_overwrite_an_out_dir_with_a_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint_last.pt").write_bytes(b"x")
    assert train.main(_args(data, out, "--epochs", "1")) == 1
    assert "--resume" in capsys.readouterr().err


def test_a_second_training_into_the_same_out_dir_refuses(data, tmp_path):
    out = tmp_path / "out"
    with train._exclusive(out):  # as a running training holds it
        with pytest.raises(train.TrainingRefused, match="in use by another training"):
            train.run(data["train"], data["img_dir"], out, mlflow=False,
                      config=_tiny_config(epochs=1))


def _tiny_config(**overrides) -> train.TrainConfig:
    return train.TrainConfig(dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), img_size=32,
                             batch_size=8, warmup_epochs=1, num_workers=0, **overrides)


def test_settings_come_from_defaults_then_params_yaml_then_flags(tmp_path):
    # params.yaml's train section is exactly TrainConfig's fields, with the paper's values.
    from_file = train.TrainConfig.resolve(ROOT / "params.yaml")
    assert from_file == train.TrainConfig(), "params.yaml train section drifted from the recipe"
    args = train.build_parser().parse_args(
        ["--train_csv", "t", "--img_dir", "i", "--epochs", "3", "--no-weighted_sampler",
         "--dims", "8,16,24,32", "--pretrained", "w.safetensors"])
    cfg = train.TrainConfig.resolve(ROOT / "params.yaml",
                                    **{k: getattr(args, k) for k in train.HP_FLAGS})
    assert (cfg.epochs, cfg.weighted_sampler, cfg.dims, cfg.pretrained) == (
        3, False, (8, 16, 24, 32), "w.safetensors")
    assert cfg.peak_lr == 0.01 and cfg.class_weighted_loss
    bad = tmp_path / "p.yaml"
    bad.write_text(yaml.safe_dump({"train": {"epoch": 3}}))
    with pytest.raises(ValueError, match="unknown train settings"):
        train.TrainConfig.resolve(bad)


def test_class_weights_from_json_or_inverse_frequency(tmp_path):
    import pandas as pd
    frame = pd.DataFrame({"label": [0, 0, 0, 1]})
    weights = train._class_weights(None, frame)
    assert weights[0] == pytest.approx(4 / (2 * 3)) and weights[1] == pytest.approx(2.0)
    assert weights[2:].eq(0).all()  # absent classes: never a target, never sampled
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"classes": list(CLASSES), "counts": [1] * 8,
                                "weights": [float(i) for i in range(8)]}))
    assert train._class_weights(path, frame).tolist() == list(range(8))
    path.write_text(json.dumps({"classes": list(reversed(CLASSES)), "weights": [1.0] * 8}))
    with pytest.raises(ValueError, match="classes"):
        train._class_weights(path, frame)


def test_transforms_give_normalised_tensors_of_the_requested_size(tmp_path):
    from components.dataset import load_rgb
    img_dir, frame = make_images(tmp_path, n_per_class=1, size=48)
    image = load_rgb(next(img_dir.iterdir()))
    for transform in (train_transform(32), eval_transform(32)):
        x = transform(image)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert -3 < x.mean() < 3
    assert torch.equal(eval_transform(32)(image), eval_transform(32)(image))


def test_weighted_sampler_balances_classes_and_replays_an_epoch():
    targets = torch.tensor([0] * 90 + [1] * 10)
    weights = torch.tensor([100 / 180, 100 / 20] + [0.0] * 6)
    sampler = make_sampler(targets, weights, seed=0)
    sampler.set_epoch(3)
    first = list(sampler)
    sampler.set_epoch(3)
    assert list(sampler) == first and len(first) == 100
    share_minority = (targets[first] == 1).float().mean()
    assert 0.35 < share_minority < 0.65


def test_distributed_weighted_sampler_shards_are_disjoint_and_cover_one_draw():
    weights = torch.rand(50).double()
    shards = [DistributedWeightedSampler(weights, 50, num_replicas=2, rank=r, seed=1)
              for r in range(2)]
    for s in shards:
        s.set_epoch(2)
    draws = [list(s) for s in shards]
    assert len(draws[0]) == len(draws[1]) == 25
    whole = torch.multinomial(weights, 50, True, generator=torch.Generator().manual_seed(
        1 * 100_003 + 2)).tolist()
    assert draws[0] == whole[0::2] and draws[1] == whole[1::2]


def _benchmark(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ham10000_benchmark_smoke(shared_data, tmp_path):
    ham = _benchmark("ham10000")
    assert ham.main(["--smoke", "--out", str(tmp_path), "--data",
                     str(shared_data / "ham10000-200x150")]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"paper", "sampler_only", "loss_only"}
    assert all(0 <= r["balanced_accuracy"] <= 1 for r in results.values())
    report = json.loads((tmp_path / "splits" / "split_report.json").read_text())
    assert report["mode"] == "grouped" and report["seed"] == 0


@pytest.mark.slow
def test_throughput_benchmark_runs_on_cpu(tmp_path):
    bench = _benchmark("train_throughput")
    out = tmp_path / "r.json"
    assert bench.main(["--cpu-tiny", "--batch_sizes", "32", "--n_images", "96",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["input"] for r in rows] == ["model step", "dataloader", "resident"]
    assert all(r["img_per_s"] > 0 and r["device"] == "cpu" for r in rows)
