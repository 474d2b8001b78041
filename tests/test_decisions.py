"""Issue 28: a calibrated model with validated operating points and an "I don't know".

Temperature scaling on a constructed over-confident model; thresholds chosen on validation and
applied unchanged on test, in the model card and in the served flag (one tiny model trained
here, calibrated by the train step itself); a served photograph (skimage.data.astronaut) through a real
`skinlesion serve` process comes back out of distribution with null flags, as valid JSON.
"""
from __future__ import annotations

import base64
import json
import os
import sys
import urllib.request
import warnings

import mlflow
import numpy as np
import pandas as pd
import pytest
from scipy.special import log_softmax, softmax

from components import evaluate, train
from components.commands import calibrate
from components.common import decisions as fitted_file
from components.common.config import EvaluateConfig
from components.common.labels import CLASSES
from components.evaluation import calibration, ood_images
from components.evaluation.decisions import at_thresholds, choose_threshold
from components.registry import model_card, serving
from components.registry import pyfunc as registry_pyfunc
from components.training import checkpoint
from procs import free_port, serve
from tiny_data import TINY, make_splits

FAST = [*TINY, "--batch_size", "8", "--warmup_epochs", "1", "--num_workers", "0", "--no-mlflow"]


def _strict_json(text: str):
    def refuse(token):
        raise ValueError(f"not JSON: bare {token}")
    return json.loads(text, parse_constant=refuse)


def _overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Over-confident logits: the true class's score is shifted by 2 in unit Gaussian noise, so
    the exact posterior has logits 2 x score; this model answers 6 x score (three times too
    sure)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 8, n)
    logits = rng.normal(0, 1, (n, 8))
    logits[np.arange(n), y] += 2.0
    return 6.0 * logits, y


def test_temperature_scaling_lowers_nll_and_ece_of_an_overconfident_model():
    val_logits, val_y = _overconfident(2000, seed=0)
    test_logits, test_y = _overconfident(2000, seed=1)
    t = calibration.fit_temperature(val_logits, val_y)
    assert 2.7 < t < 3.3  # the factor 3 found back
    before = calibration.scores(test_y, softmax(test_logits, axis=1))
    after = calibration.scores(test_y, calibration.scaled_probs(test_logits, t))
    assert after["nll"] < 0.7 * before["nll"]
    assert after["ece"] < 0.5 * before["ece"] and after["brier"] < before["brier"]
    # the same map on probabilities (evaluate --tta) and accuracy unchanged
    np.testing.assert_allclose(calibration.rescale_probs(softmax(test_logits, axis=1), t),
                               calibration.scaled_probs(test_logits, t), atol=1e-9)
    assert (calibration.scaled_probs(test_logits, t).argmax(1) == test_logits.argmax(1)).all()
    assert calibration.nll(test_y, log_softmax(test_logits, axis=1)) == pytest.approx(
        before["nll"])


def test_the_validation_threshold_is_applied_unchanged_to_test():
    rng = np.random.default_rng(0)
    val_pos, test_pos = rng.random(400) < 0.2, rng.random(400) < 0.2
    val_score, test_score = val_pos + rng.normal(0, 0.6, 400), test_pos + rng.normal(0, 0.6, 400)
    spec = choose_threshold(val_pos, val_score, "specificity", 0.9)
    assert spec["specificity"] >= 0.9
    assert np.mean(val_score[~val_pos] >= spec["threshold"]) <= 0.1
    sens = choose_threshold(val_pos, val_score, "sensitivity", 0.9)
    assert sens["sensitivity"] >= 0.9 and sens["threshold"] < spec["threshold"]

    probs = np.zeros((400, len(CLASSES)))  # the MEL column carries the score
    probs[:, CLASSES.index("MEL")] = (test_score - test_score.min()) / np.ptp(test_score)
    fitted = {"decisions": {"melanoma_suspected": {
        "classes": ["MEL"], "target": "specificity", "value": 0.9,
        "threshold": float((spec["threshold"] - test_score.min()) / np.ptp(test_score))}}}
    y = np.where(test_pos, CLASSES.index("MEL"), CLASSES.index("NV"))
    got = at_thresholds(y, probs, list(CLASSES), fitted, n=200)["melanoma_suspected"]
    flagged = test_score >= spec["threshold"]
    assert got["threshold"] == fitted["decisions"]["melanoma_suspected"]["threshold"]
    assert got["chosen_on"] == "validation"
    assert got["sensitivity"] == pytest.approx(np.mean(flagged[test_pos]))
    assert got["specificity"] == pytest.approx(np.mean(~flagged[~test_pos]))
    ci = got["ci95"]["sensitivity"]
    assert ci["low"] < got["sensitivity"] < ci["high"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained on the tiny set: the train step fits calibration.json at its end."""
    root = tmp_path_factory.mktemp("calibrated")
    data = make_splits(root, n_per_class=4)
    out = root / "train"
    assert train.main(["--train_csv", str(data["train"]), "--img_dir", str(data["img_dir"]),
                       "--val_csv", str(data["val"]), "--out_dir", str(out), "--epochs", "6",
                       "--peak_lr", "0.002",
                       *FAST]) == 0
    return data, out


@pytest.fixture(scope="module")
def served_model(trained, tmp_path_factory):
    """The pyfunc folder of the trained model, its calibration.json inside."""
    _, out = trained
    root = tmp_path_factory.mktemp("served")
    model, meta = checkpoint.load_model(out / "ema_weights.pt")
    meta["weights_digest"] = checkpoint.weights_digest(model.state_dict())
    artifacts = serving.write_artifacts(model.state_dict(), meta, root / "staging",
                                        calibration=out / "calibration.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlflow.pyfunc.save_model(str(root / "model"),
                                 **registry_pyfunc.pyfunc_kwargs(artifacts, list(CLASSES)))
    return root / "model", meta["weights_digest"]


def test_one_threshold_from_validation_to_evaluate_card_and_served_flag(trained, served_model,
                                                                         tmp_path):
    data, out = trained
    fitted = json.loads((out / "calibration.json").read_text())
    assert fitted["fitted_on"]["split"] == "validation" and fitted["temperature"] > 0
    threshold = fitted["decisions"]["melanoma_suspected"]["threshold"]

    evaluate.run(out, data["test"], data["img_dir"], tmp_path / "eval",
                 config=EvaluateConfig(bootstrap=50), use_mlflow=False, device="cpu")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    at_test = metrics["decisions"]["melanoma_suspected"]
    assert at_test["threshold"] == threshold and at_test["chosen_on"] == "validation"
    assert metrics["melanoma_operating_point"]["chosen_on"] == "test"  # kept, labelled
    cal = metrics["calibration"]
    assert cal["temperature"] == fitted["temperature"] and set(cal) >= {"before", "after"}
    assert 0.5 <= metrics["ood"]["auroc"] <= 1.0 and metrics["ood"]["n_out"] >= 20

    tags = model_card.version_tags("r", {}, {}, metrics, {}, "d", "balanced_accuracy")
    assert float(tags["threshold_melanoma_suspected"]) == threshold
    card = model_card.card_details("m", "1", tags, metrics, {}, {}, {}, None)
    assert card["decisions"]["melanoma_suspected"]["threshold"] == threshold
    text = model_card.model_card("m", "r", "run", tags, metrics, {}, {}, None)
    assert f"| melanoma_suspected | specificity >= 0.9 | {threshold!r} |" in text

    model_path, digest = served_model
    served = mlflow.pyfunc.load_model(str(model_path), model_config={"allow_paths": True})
    test = [str(p) for p in sorted(data["img_dir"].glob("test_*.jpg"))]
    answer = served.predict(pd.DataFrame({"image": test}))
    inside = answer["in_distribution"].astype(bool)
    assert inside.mean() >= 0.5  # the threshold lets 95% of validation images through
    for _, row in answer[inside].iterrows():
        assert row["melanoma_suspected"] == (row["MEL"] >= threshold)
    assert (answer["model_version"] == digest).all()
    raw = pd.read_csv(tmp_path / "eval" / "predictions.csv")  # evaluate's uncalibrated
    calibrated = calibration.rescale_probs(raw[[f"prob_{c}" for c in CLASSES]].to_numpy(),
                                           fitted["temperature"])
    np.testing.assert_allclose(answer[list(CLASSES)].astype(float).to_numpy(), calibrated,
                               atol=1e-2)  # served: resized again from the JPEG


def test_a_model_without_calibration_still_serves_and_says_why(model_dir, images):
    answer = serving.load_local(model_dir, allow_paths=True).predict(
        None, pd.DataFrame({"image": [str(images["a.jpg"])]}))
    row = answer.iloc[0]
    assert row["error"] == "" and row["predicted"] in CLASSES
    assert row["melanoma_suspected"] is None and row["in_distribution"] is None
    assert row["reason"] == fitted_file.NO_FILE


def test_a_served_photo_is_out_of_distribution_with_null_flags_as_valid_json(
        trained, served_model, tmp_path):
    data, _ = trained
    model_path, digest = served_model
    port = free_port()
    cmd = [sys.executable, "-m", "components.commands.cli", "serve", "--model", str(model_path),
           "--port", str(port)]
    # a thumbnail: the tiny model's per-image pixel limit is 128 x 36^2
    photo = ood_images.png_bytes(ood_images.images()["photo_astronaut"].resize((160, 160)))
    lesions = [p.read_bytes() for p in sorted(data["img_dir"].glob("test_*.jpg"))[::4]]
    rows = [[base64.b64encode(b).decode()] for b in (photo, b"not an image", *lesions)]
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()
    with serve(cmd, f"http://127.0.0.1:{port}/ping", tmp_path / "serve.log", timeout=300,
               env={**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as reply:
            text = reply.read().decode()
    photo_row, broken, *lesion_rows = _strict_json(text)["predictions"]
    assert photo_row["in_distribution"] is False and photo_row["error"] == ""
    assert photo_row["melanoma_suspected"] is None and photo_row["malignant_suspected"] is None
    assert "not like the training images" in photo_row["reason"] and photo_row["ood_score"] is not None
    assert {row["model_version"] for row in (photo_row, *lesion_rows)} == {digest}
    inside = [row for row in lesion_rows if row["in_distribution"]]
    assert len(inside) >= len(lesion_rows) / 2  # 95% of validation images pass
    for row in inside:
        assert row["reason"] == "" and isinstance(row["melanoma_suspected"], bool)
        assert sum(row[c] for c in CLASSES) == pytest.approx(1.0, rel=1e-5)
    assert broken["error"] and broken["in_distribution"] is None
    assert broken["melanoma_suspected"] is None


def test_calibrate_fits_an_existing_training_folder_as_train_did(trained, tmp_path, capsys):
    data, out = trained
    args = ["--train_dir", str(out), "--train_csv", str(data["train"]), "--val_csv",
            str(data["val"]), "--img_dir", str(data["img_dir"])]
    assert calibrate.main(args) == 1  # train wrote one: kept
    assert "calibration.json exists; pass --overwrite" in capsys.readouterr().err
    assert calibrate.main([*args, "--out", str(tmp_path / "c.json")]) == 0
    by_train = json.loads((out / "calibration.json").read_text())
    by_command = json.loads((tmp_path / "c.json").read_text())
    assert by_command["weights_digest"] == by_train["weights_digest"]
    assert by_command["temperature"] == pytest.approx(by_train["temperature"], rel=1e-3)
    for name, d in by_train["decisions"].items():
        assert by_command["decisions"][name]["threshold"] == pytest.approx(d["threshold"],
                                                                           abs=1e-4)
    assert calibrate.main(["--train_dir", str(tmp_path), *args[2:]]) == 1
    assert "holds neither ema_weights.pt nor checkpoint_last.pt" in capsys.readouterr().err


def test_tampered_ood_statistics_stop_evaluate_in_one_line(trained, tmp_path, capsys):
    data, out = trained
    copy = tmp_path / "train"
    copy.mkdir()
    for name in ("ema_weights.pt", "calibration.json", "ood_stats.safetensors"):
        (copy / name).write_bytes((out / name).read_bytes())
    stats = copy / "ood_stats.safetensors"
    stats.write_bytes(stats.read_bytes()[:-8] + bytes(8))  # a zeroed precision entry
    assert evaluate.main(["--model", str(copy), "--test_csv", str(data["test"]), "--img_dir",
                          str(data["img_dir"]), "--out", str(tmp_path / "eval"),
                          "--no_mlflow", "--bootstrap", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ood_stats.safetensors: missing, or not the statistics" in err
    assert not (tmp_path / "eval" / "metrics.json").exists()
