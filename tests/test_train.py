"""The training step on tiny CPU data: CLI, outputs, overfit sanity check, refusals, settings,
transforms, samplers and class weights."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from components import train
from components.common import cli_args
from components.common.config import ConfigError, TrainConfig
from components.common.labels import CLASSES
from components.training import checkpoint
from components.training.balance import class_balance
from components.training.out_dir import exclusive, settings_fingerprint
from components.training.samplers import DistributedWeightedSampler, make_sampler
from components.training.training_data import TrainingData
from components.training.transforms import eval_transform, train_transform
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
    summary = train.run(TrainingData.read(data["train"], data["img_dir"]), tmp_path / "out",
                        use_mlflow=False, config=_tiny_config(epochs=1))
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


def test_an_earlier_runs_files_without_its_last_checkpoint_are_kept(data, tmp_path, capsys):
    """checkpoint_last.pt gone (deleted by hand, a dvc checkout of another version) but the
    earlier run's best checkpoint still there: a fresh training would overwrite it at its first
    best epoch. Without --resume it refuses; with --resume auto the files are moved aside."""
    from components.training.out_dir import auto_resume

    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint_best.pt").write_bytes(b"the earlier run's best")
    assert train.main(_args(data, out, "--epochs", "1")) == 1
    assert "checkpoint_best.pt" in capsys.readouterr().err
    assert (out / "checkpoint_best.pt").read_bytes() == b"the earlier run's best"

    assert auto_resume(out, "any fingerprint") == (None, None)
    [aside] = out.glob("superseded-*")
    assert (aside / "checkpoint_best.pt").read_bytes() == b"the earlier run's best"
    assert not (out / "checkpoint_best.pt").exists() and f"moved to {aside}" in capsys.readouterr().out


def test_a_second_training_into_the_same_out_dir_refuses(data, tmp_path):
    out = tmp_path / "out"
    with exclusive(out):  # as a running training holds it
        with pytest.raises(train.TrainingRefused, match="in use by another training"):
            train.run(TrainingData.read(data["train"], data["img_dir"]), out, use_mlflow=False,
                      config=_tiny_config(epochs=1))


def test_resume_auto_ignores_how_a_run_is_executed_and_sets_another_recipe_aside(data, tmp_path,
                                                                              capsys):
    """`--resume auto` (the DVC stage, a resubmitted TrainJob) continues a run whatever its
    input path, workers or node layout; a run of another recipe is moved aside, not deleted."""
    out = tmp_path / "out"
    auto = ["--val_csv", str(data["val"]), "--epochs", "2", "--resume", "auto"]
    assert train.main(_args(data, out, *auto, "--stop_after_epoch", "1")) == 0
    capsys.readouterr()
    assert train.main(_args(data, out, *auto, "--gpu_resident", "on", "--num_workers", "1",
                            "--gpu_resident_max_share", "0.9")) == 0
    assert "resuming" in capsys.readouterr().out
    assert checkpoint.load(out / "checkpoint_last.pt")["epoch"] == 2
    run_files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and
                 not p.name.startswith(".")}

    assert train.main(_args(data, out, *auto, "--peak_lr", "0.02")) == 0
    printed = capsys.readouterr().out
    [aside] = out.glob("superseded-*")
    assert f"moved to {aside}" in printed and "starting over" in printed
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == run_files
    assert checkpoint.load(out / "checkpoint_last.pt")["train_config"]["train"]["peak_lr"] == 0.02

    def fingerprint(cfg, world_size=1):
        return settings_fingerprint(cfg, world_size, "the inputs' digest", None)
    one = _tiny_config()
    assert fingerprint(one) == fingerprint(replace(one, num_workers=3, compile=True,
                                                   gpu_resident="on", gpu_resident_max_share=0.9))
    assert fingerprint(replace(one, nodes=2), 2) == fingerprint(replace(one, gpus_per_node=2), 2)
    assert fingerprint(one, 2) != fingerprint(one) != fingerprint(replace(one, peak_lr=0.02))


def _tiny_config(**overrides) -> train.TrainConfig:
    return train.TrainConfig(preset="tiny", img_size=32, batch_size=8, warmup_epochs=1,
                             num_workers=0, **{"self_supervised_epochs": 0, **overrides})


def test_settings_come_from_params_yaml_then_flags_in_either_spelling():
    args = train.build_parser().parse_args(
        ["--train_csv", "t", "--img-dir", "i", "--epochs", "3", "--no-weighted_sampler",
         "--dims", "8,16,24,32", "--pretrained", "w.safetensors", "--logit-adjust-tau", "1"])
    cfg = train.TrainConfig.resolve(ROOT / "params.yaml",
                                    **cli_args.config_flags(args, train.TrainConfig))
    assert (cfg.epochs, cfg.weighted_sampler, cfg.dims, cfg.pretrained) == (
        3, False, (8, 16, 24, 32), "w.safetensors")
    assert args.img_dir == "i" and cfg.logit_adjust_tau == 1.0
    assert cfg.peak_lr == 0.01  # from params.yaml


# The paper repository's train.py flags (README, "Training"): each name, meaning and default
# is part of the user surface and stays as it is; None: the value comes from the params files.
PAPER_FLAGS = {"train_csv": None, "val_csv": None, "test_csv": None, "img_dir": None,
               "epochs": None, "batch_size": None, "peak_lr": None, "warmup_epochs": None,
               "mixup_alpha": None, "ema_decay": None, "out_dir": "outputs/train",
               "resume": None, "overfit_mode": False, "overfit_n": 32, "grad_clip": None,
               "num_workers": None}


def test_the_paper_repositorys_flags_stay_as_they_are():
    parser = train.build_parser()
    options = {a.dest: a for a in parser._actions}
    for name, default in PAPER_FLAGS.items():
        assert f"--{name}" in parser._option_string_actions, name
        assert options[name].default == default, name
    args = parser.parse_args(["--train_csv", "t", "--img_dir", "i", "--epochs", "7",
                              "--peak_lr", "0.02", "--num_workers", "auto", "--overfit_mode"])
    assert (args.epochs, args.peak_lr, args.num_workers, args.overfit_mode) == \
        (7, 0.02, "auto", True)
    assert parser.parse_args(["--train_csv", "t", "--img_dir", "i",
                              "--num_workers", "2"]).num_workers == 2


@pytest.mark.parametrize("flag,value,says", [
    ("--dims", "8,x,24,32", "invalid comma-separated int value: '8,x,24,32'"),
    ("--num_workers", "[1", "invalid YAML value: '[1'"),
    ("--gpu_resident", "maybe", "invalid choice: 'maybe'"),
])
def test_a_flag_value_of_the_wrong_type_is_one_line_naming_the_flag(capsys, flag, value, says):
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--train_csv", "t", "--img_dir", "i", flag, value])
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and says in err and "Traceback" not in err, err


def test_params_has_no_config_alias(capsys):
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--train_csv", "t", "--img_dir", "i",
                                         "--config", "params.yaml"])
    assert "--config" in capsys.readouterr().err


def test_bad_settings_stop_before_any_work(data, tmp_path, capsys):
    out = tmp_path / "out"
    for flags, key in ((["--peak_lr", "nan"], "train.peak_lr"), (["--epochs", "0"], "train.epochs"),
                       (["--img_size", "7"], "train.img_size"),
                       (["--ema_decay", "1.5"], "train.ema_decay")):
        assert train.main(_args(data, out, *flags)) == 1
        assert key in capsys.readouterr().err
    assert not out.exists()


def test_class_balance_from_json_or_inverse_frequency(tmp_path):
    import pandas as pd
    frame = pd.DataFrame({"label": [0, 0, 0, 1]})
    with pytest.warns(UserWarning, match="no image of class BCC"):
        weights, priors = class_balance(None, frame)
    assert weights[0] == pytest.approx(4 / (2 * 3)) and weights[1] == pytest.approx(2.0)
    assert weights[2:].eq(0).all()  # absent classes: never a target, never sampled
    assert priors[0] == pytest.approx(3 / 4) and 0 < priors[2] < priors[1]  # finite log prior
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"classes": list(CLASSES), "counts": [1] * 8,
                                "weights": [float(i) for i in range(8)]}))
    assert class_balance(path, frame)[0].tolist() == list(range(8))
    path.write_text(json.dumps({"classes": list(reversed(CLASSES)), "weights": [1.0] * 8}))
    with pytest.raises(ValueError, match="classes"):
        class_balance(path, frame)


def test_transforms_give_normalised_tensors_of_the_requested_size(tmp_path):
    from components.training.dataset import load_rgb
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


def test_deferred_sampler_shuffles_plainly_then_balances():
    """DRS: each image once per epoch before `defer_epochs`, the weighted draw after, on one
    process and on two DDP ranks (whose shards stay disjoint in the plain epochs)."""
    targets = torch.tensor([0] * 90 + [1] * 10)
    weights = torch.tensor([100 / 180, 100 / 20] + [0.0] * 6)
    single = make_sampler(targets, weights, seed=0, defer_epochs=2)
    ranks = [make_sampler(targets, weights, seed=0, num_replicas=2, rank=r, defer_epochs=2)
             for r in range(2)]
    for epoch in range(4):
        for sampler in (single, *ranks):
            sampler.set_epoch(epoch)
        draw = list(single)
        minority = (targets[draw] == 1).float().mean()
        shards = [list(r) for r in ranks]
        if epoch < 2:
            assert sorted(draw) == list(range(100)) and minority == 0.1
            assert sorted(shards[0] + shards[1]) == list(range(100))
        else:
            assert len(draw) == 100 and 0.35 < minority < 0.65
            assert len(shards[0]) == len(shards[1]) == 50
    with pytest.raises(ConfigError, match="defer_sampler_epochs"):
        TrainConfig(epochs=5, defer_sampler_epochs=5).check()


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


def test_ham10000_study_smoke_resumes_and_writes_its_table(shared_data, tmp_path):
    ham = _benchmark("ham10000")
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Results\n\nkept text\n")
    argv = ["--smoke", "--out", str(tmp_path / "study"), "--data",
            str(shared_data / "ham10000-200x150"), "--variants", "paper,logit_adjusted",
            "--no_mlflow", "--results", str(results_md)]
    assert ham.main(argv) == 0
    runs = sorted((tmp_path / "study" / "runs").glob("*/result.json"))
    assert [p.parent.name for p in runs] == ["logit_adjusted-e1-s0", "paper-e1-s0"]
    result = json.loads(runs[1].read_text())
    assert result["weighted_sampler"] and result["class_weighted_loss"]
    assert 0 <= result["test"]["balanced_accuracy"] <= 1
    ci = result["val"]["ci95"]["balanced_accuracy"]
    assert ci["low"] <= result["val"]["balanced_accuracy"] <= ci["high"]
    # the study keeps the StratifiedGroupKFold split its figures were measured on
    report = json.loads((tmp_path / "study" / "splits" / "split_report.json").read_text())
    assert report["mode"] == "folds" and report["seed"] == 0
    text = results_md.read_text()
    assert "kept text" in text and text.count("| paper | 0 |") == 1
    # every row names the command that reproduces it
    assert "--variants paper --seeds 0 --no_mlflow`" in text
    assert result["command"].endswith("--variants paper --seeds 0 --no_mlflow")
    mtime = runs[1].stat().st_mtime
    assert ham.main(argv) == 0  # finished runs are skipped, the section replaced, not appended
    assert runs[1].stat().st_mtime == mtime and results_md.read_text().count("| paper | 0 |") == 1

    # one more recipe change: its own run folder, row and command
    argv[argv.index("paper,logit_adjusted")] = "paper"
    assert ham.main([*argv, "-S", "train.mixup_alpha=0"]) == 0
    changed = json.loads((tmp_path / "study/runs/paper-mixup_alpha0-e1-s0/result.json").read_text())
    assert changed["changes"] == {"mixup_alpha": 0}
    assert changed["command"].endswith("--seeds 0 -S train.mixup_alpha=0 --no_mlflow")
    text = results_md.read_text()
    assert text.count("| paper + mixup_alpha=0 | 0 |") == 1 and text.count("| paper | 0 |") == 1
    for bad in ("train.no_such_key=1", "evaluate.tta=true", "train.mixup_alpha",
                "train.weighted_sampler=false", "train.seed=3"):
        with pytest.raises(SystemExit):
            ham.main([*argv, "-S", bad])


@pytest.mark.parametrize("bad,named", [
    ("train.dims=[&a [1], *a]", "aliases"),             # the params loader's refusal
    ("train.peak_lr=fast", "train.peak_lr: 'fast' is not a float"),  # the config refuses
    ("train.drop_path_rate=2", "train.drop_path_rate = 2"),
])
def test_ham10000_study_refuses_a_bad_param_value_in_one_line(tmp_path, capsys, bad, named):
    ham = _benchmark("ham10000")
    with pytest.raises(SystemExit) as stop:
        ham.main(["--out", str(tmp_path), "--report_only", "-S", bad])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and named in err and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].count(named) == 1


@pytest.mark.slow
def test_throughput_benchmark_runs_on_cpu(tmp_path):
    bench = _benchmark("train_throughput")
    out = tmp_path / "r.json"
    assert bench.main(["--cpu-tiny", "--batch_sizes", "32", "--n_images", "96",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["input"] for r in rows] == ["model step", "dataloader", "resident"]
    assert all(r["img_per_s"] > 0 and r["device"] == "cpu" for r in rows)


def test_resume_is_exact_with_dataloader_workers(data, tmp_path):
    """Augmentations are seeded per sample from (seed, epoch, position): a run stopped after
    epoch 1 and resumed with fresh DataLoader workers ends on the uninterrupted run's weights."""
    extra = ["--epochs", "3", "--num_workers", "2", "--gpu_resident", "off", "--augment"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train.main(_args(data, whole, *extra)) == 0
    assert train.main(_args(data, parts, *extra, "--stop_after_epoch", "1")) == 0
    assert train.main(_args(data, parts, *extra, "--resume", str(parts / "checkpoint_last.pt"))) == 0
    a = checkpoint.load(whole / "checkpoint_last.pt")
    b = checkpoint.load(parts / "checkpoint_last.pt")
    assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"]
    for which in ("model", "ema"):
        assert max((a[which][k].float() - b[which][k].float()).abs().max().item()
                   for k in a[which]) < 1e-6, which
    assert [h["train_loss"] for h in a["history"]] == pytest.approx(
        [h["train_loss"] for h in b["history"]], abs=1e-6)


def test_num_workers_auto_uses_what_this_process_may_run_on(monkeypatch):
    cfg = TrainConfig.resolve(ROOT / "params.yaml")
    assert cfg.num_workers == "auto"  # params.yaml asks no fixed count of any machine
    for cpus, workers in ((1, 0), (2, 1), (3, 2), (64, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)))
        assert cfg.loader_workers() == workers
    assert TrainConfig.resolve(ROOT / "params.yaml", num_workers=2).loader_workers() == 2
    with pytest.raises(ConfigError, match="train.num_workers"):
        TrainConfig.resolve(ROOT / "params.yaml", num_workers="some")
