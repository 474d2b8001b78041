"""promote on the paired rule (issue 27, item 2): two tiny models trained on tiny data with
different test splits, registered on a real `mlflow server`; promote scores the champion on
the challenger's test images less the champion's own train/val lesions, and decides on the
paired interval of the difference, not on the two versions' own test scores.

S learns the colours (right on every clean image); W barely trains (right on a few). Each
test split is chosen after training, from their predictions on a pool of new lesions:
- model "up": champion W, challenger S tested on 4 images S gets right and W wrong, plus 16
  mislabelled images of W's training lesions, which S gets wrong: S's own score is the lower,
  but on the 4 shared images S is better: promoted;
- model "down": champion S, challenger W tested on images both get right, 4 W gets wrong and
  8 of S's training lesions: W's own score is the higher, on the shared images it is worse:
  kept;
- model "same": champion W, challenger S2 (strong, trained and tested on W's split): the
  same rule on their logged predictions, nothing left out.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from components import evaluate, register, train
from components.commands import promote
from components.common.config import EvaluateConfig, RegisterConfig
from tiny_data import make_images

N_CLASSES = 8


def _images(root: Path, prefix: str, n_per_class: int, seed: int, lesions=None) -> pd.DataFrame:
    _, frame = make_images(root, n_per_class, size=40, seed=seed, prefix=prefix)
    frame["lesion_id"] = lesions if lesions is not None else [f"L-{i}" for i in frame["image"]]
    return frame


def _split_folder(folder: Path, train_: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame) -> Path:
    """A split folder as the split step writes it: three CSVs and the report with their hash."""
    folder.mkdir(parents=True)
    digest = hashlib.sha256()
    for name, frame in (("train", train_), ("val", val), ("test", test)):
        data = frame.sort_values("image").to_csv(index=False, lineterminator="\n").encode()
        (folder / f"{name}.csv").write_bytes(data)
        digest.update(data)
    report = folder / "split_report.json"
    report.write_text(json.dumps({"mode": "grouped", "seed": 0, "split_hash": digest.hexdigest()}))
    return report


def _train(data: Path, img_dir: Path, tag: str, train_: pd.DataFrame, val: pd.DataFrame,
           **recipe) -> Path:
    """Train from CSVs without a split report beside them (the test split comes later)."""
    folder = data / f"{tag}-training"
    folder.mkdir()
    train_.to_csv(folder / "train.csv", index=False)
    val.to_csv(folder / "val.csv", index=False)
    cfg = train.TrainConfig(preset="tiny", img_size=32, batch_size=8, warmup_epochs=1,
                            num_workers=0, seed=0, gpu_resident="off", self_supervised_epochs=0,
                            **recipe)
    train.run(train.TrainingData.read(folder / "train.csv", img_dir, val_csv=folder / "val.csv"),
              data / tag, config=cfg)
    return data / tag


def _right(data: Path, img_dir: Path, model: Path, pool: pd.DataFrame) -> pd.Series:
    """Which pool images the model gets right (scored without MLflow)."""
    pool.to_csv(data / "pool.csv", index=False)
    out = data / f"{model.name}-pool"
    evaluate.run(model, data / "pool.csv", img_dir, out, config=EvaluateConfig(bootstrap=10),
                 use_mlflow=False)
    p = pd.read_csv(out / "predictions.csv")
    return pd.Series((p["true"] == p["predicted"]).to_numpy(), index=p["image"])


@pytest.fixture(scope="module")
def versions(mlflow_server, tmp_path_factory):
    """Both models trained, each evaluated on its own test split and ready to register."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    data = tmp_path_factory.mktemp("paired")
    img_dir = data / "images"
    w_train, w_val = _images(data, "wtr", 6, 0), _images(data, "wva", 2, 1)
    s_train, s_val = _images(data, "str", 6, 2), _images(data, "sva", 2, 3)
    pool = _images(data, "po", 6, 4)
    # mislabelled images of W's training lesions (S predicts their colour: wrong)
    adverse = _images(data, "adv", 2, 5, lesions=list(w_train["lesion_id"][:16]))
    adverse["label"] = (adverse["label"] + 1) % N_CLASSES
    s_lesions = _images(data, "sx", 1, 6, lesions=list(s_train["lesion_id"][:N_CLASSES]))

    weak = _train(data, img_dir, "W", w_train, w_val, epochs=1, peak_lr=1e-7,
                  warmup_lr=1e-8, min_lr=1e-8)
    strong = _train(data, img_dir, "S", s_train, s_val, epochs=8)
    strong_on_w = _train(data, img_dir, "S2", w_train, w_val, epochs=8)  # W's split too
    w_right, s_right = _right(data, img_dir, weak, pool), _right(data, img_dir, strong, pool)
    both = pool[(w_right & s_right).to_numpy()]
    only_s = pool[(~w_right & s_right).to_numpy()]
    assert len(both) >= 3 and len(only_s) >= 8, "the tiny models did not come out weak/strong"

    out = {}
    for tag, model, train_, val, test in (
            ("S", strong, s_train, s_val, pd.concat([only_s[:4], adverse])),
            ("W", weak, w_train, w_val, pd.concat([both[:6], only_s[4:8], s_lesions]))):
        report = _split_folder(data / f"{tag}-split", train_, val, test)
        out[tag] = _evaluated(data, img_dir, tag, model, report)
        out[tag]["n_test"] = len(test)
    out["S2"] = _evaluated(data, img_dir, "S2", strong_on_w, out["W"]["report"])
    out["img_dir"], out["uri"] = img_dir, mlflow_server
    yield out
    mp.undo()


def _evaluated(data: Path, img_dir: Path, tag: str, model: Path, report: Path) -> dict:
    evaluate.run(model, report.parent / "test.csv", img_dir, data / f"{tag}-eval",
                 config=EvaluateConfig(bootstrap=20))
    return {"train": model, "metrics": data / f"{tag}-eval" / "metrics.json", "report": report}


def _register(versions: dict, tag: str, name: str) -> str:
    v = versions[tag]
    cfg = RegisterConfig(model_name=name, gate_metric="accuracy", retries=0)
    return register.run(v["train"], v["metrics"], v["report"], config=cfg)["version"]


def _promote(versions: dict, tag: str, name: str) -> dict:
    return promote.run("accuracy", name, split_dir=versions[tag]["report"].parent,
                       img_dir=versions["img_dir"], config=RegisterConfig(retries=0))


def test_a_challenger_better_on_the_shared_images_is_promoted(versions, capsys):
    client = mlflow.MlflowClient(versions["uri"], registry_uri=versions["uri"])
    name = "paired-up"
    w = _register(versions, "W", name)
    assert _promote(versions, "W", name)["decision"] == "first"
    s = _register(versions, "S", name)
    assert promote.main(["--model_name", name, "--metric", "accuracy",
                         "--split_dir", str(versions["S"]["report"].parent),
                         "--img_dir", str(versions["img_dir"])]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("promoted: accuracy on the same 4 test images (4 lesions; 16 of "
                              "the challenger's 20 left out")
    result = json.loads(printed[printed.index("{"):])
    paired = result["paired"]
    # its own test split counted W's training lesions, which S gets wrong: its own score is
    # the lower, yet on the images fair to both it is better
    assert result["challenger_value"] < result["champion_value"]
    assert (paired["n_test"], paired["n_left_out"], paired["n_images"]) == (20, 16, 4)
    assert paired["challenger"] == 1.0 and paired["champion"] == 0.0
    assert paired["low"] == paired["high"] == 1.0
    assert (paired["scores_challenger"], paired["scores_champion"]) == ("logged", "scored")
    assert str(client.get_model_version_by_alias(name, "champion").version) == s
    for version, other in ((s, w), (w, s)):
        tag = json.loads(client.get_model_version(name, version).tags[f"paired_vs_v{other}"])
        assert tag["difference"] == 1.0 and tag["n_left_out"] == 16


def test_a_challenger_worse_on_the_shared_images_is_kept_out_despite_its_own_score(versions):
    client = mlflow.MlflowClient(versions["uri"], registry_uri=versions["uri"])
    name = "paired-down"
    s = _register(versions, "S", name)
    assert _promote(versions, "S", name)["decision"] == "first"
    _register(versions, "W", name)
    result = _promote(versions, "W", name)
    paired = result["paired"]
    assert result["challenger_value"] > result["champion_value"]  # W's own test score
    assert result["decision"] == "kept", result["reason"]
    assert paired["n_left_out"] == N_CLASSES  # S's training lesions
    assert paired["n_images"] == versions["W"]["n_test"] - N_CLASSES
    assert paired["champion"] == 1.0 and paired["difference"] < 0 and paired["high"] < 0
    assert str(client.get_model_version_by_alias(name, "champion").version) == s


def test_on_a_shared_split_both_logged_predictions_are_paired(versions):
    """The same rule when both versions were tested on one split: no image left out, each
    side's scores from its own evaluation's predictions.csv, nothing scored again."""
    client = mlflow.MlflowClient(versions["uri"], registry_uri=versions["uri"])
    name = "paired-same"
    _register(versions, "W", name)
    assert _promote(versions, "W", name)["decision"] == "first"
    s2 = _register(versions, "S2", name)
    result = _promote(versions, "W", name)
    paired = result["paired"]
    assert result["decision"] == "promoted", result["reason"]
    assert paired["n_left_out"] == 0 and paired["n_images"] == versions["W"]["n_test"]
    assert (paired["scores_challenger"], paired["scores_champion"]) == ("logged", "logged")
    assert paired["challenger"] == pytest.approx(result["challenger_value"], abs=1e-6)
    assert paired["champion"] == pytest.approx(result["champion_value"], abs=1e-6)
    assert paired["low"] > 0
    assert str(client.get_model_version_by_alias(name, "champion").version) == s2


def test_a_champion_without_a_record_of_its_training_lesions_is_refused(versions, tmp_path):
    """A version registered from a split report given as a dict (no split folder) has no
    record; promote cannot tell which test images it trained on, so it refuses."""
    client = mlflow.MlflowClient(versions["uri"], registry_uri=versions["uri"])
    name = "paired-unrecorded"
    v = versions["W"]
    report = json.loads(v["report"].read_text())
    # a copy of W's run whose record is missing: registered under another name, from a
    # new run the register step makes for an untracked training
    cfg = RegisterConfig(model_name=name, gate_metric="accuracy", retries=0)
    weights = v["train"] / "ema_weights.pt"
    register.run(weights, v["metrics"], report, config=cfg)
    assert _promote(versions, "W", name)["decision"] == "first"
    _register(versions, "S", name)
    result = _promote(versions, "S", name)
    assert result["decision"] == "refused"
    assert "different test splits" in result["reason"] and "no record of its training" in result["reason"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
