"""The evaluate step end to end on a tiny checkpoint (the training layout) and tiny images:
metrics with intervals, the melanoma operating point, what was scored, refusals."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from components.training import checkpoint

from components import evaluate
from components.common.config import EvaluateConfig
from components.common.labels import CLASSES
from components.training.transforms import IMAGENET_MEAN, IMAGENET_STD
from model import HybridConvNeXtV2
from pipeline.publish import kfp_outputs

IMG_SIZE = 32
N_IMAGES = 24
OUTPUT_FILES = ("predictions.csv", "per_class.csv", "roc.csv", "reliability.csv",
                "confusion_matrix.png", "confusion_matrix_normalized.png", "roc.png",
                "reliability.png")


def _tiny_model(seed: int) -> HybridConvNeXtV2:
    torch.manual_seed(seed)
    return HybridConvNeXtV2(num_classes=len(CLASSES), preset="tiny").eval()


def save_checkpoint(path, weights=("model", "ema"), mlflow_run_id=None):
    """A checkpoint in the training layout with different raw and EMA weights."""
    model = _tiny_model(0)
    state = {"model_config": model.config, "classes": list(CLASSES), "img_size": IMG_SIZE,
             "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
             "epoch": 1, "step": 3, "mlflow_run_id": mlflow_run_id}
    for i, key in enumerate(weights):
        state[key] = _tiny_model(i).state_dict()
    checkpoint.save(path, state)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny images (every class, three images per lesion) and the test split CSV."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_IMAGES):
        name = f"ISIC_{i:07d}"
        pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{name}.jpg")
        rows.append({"image": name, "label": i % len(CLASSES), "lesion_id": f"L{i // 3}"})
    pd.DataFrame(rows).to_csv(root / "test.csv", index=False)
    save_checkpoint(root / "checkpoint_last.pt")
    return root


def _run(data, out, model=None, use_mlflow=False, **settings):
    cfg = EvaluateConfig(**{"bootstrap": 30, "batch_size": 8, **settings})
    return evaluate.run(model or data / "checkpoint_last.pt", data / "test.csv",
                        data / "images", out, config=cfg, use_mlflow=use_mlflow)


def test_end_to_end_outputs_are_consistent(data, tmp_path):
    out = tmp_path / "eval"
    summary = _run(data, out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert summary["weights"] == metrics["weights"] == "ema"
    assert metrics["n_images"] == summary["n_images"] == N_IMAGES
    assert summary["balanced_accuracy"] == metrics["balanced_accuracy"]
    assert metrics["bootstrap"] == {"resamples": 30, "seed": 0, "unit": "lesion", "level": 0.95}
    for name in ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc_macro", "ece"):
        ci = metrics["ci95"][name]
        assert ci["low"] <= metrics[name] <= ci["high"], name
    assert np.sum(metrics["confusion_matrix"]) == N_IMAGES
    # raw weights: evaluated too, nested under "raw" and written to out/raw
    assert metrics["raw"]["n_images"] == N_IMAGES and "raw" not in metrics["raw"]
    assert "raw_balanced_accuracy" in summary
    for folder in (out, out / "raw"):
        for name in OUTPUT_FILES:
            assert (folder / name).stat().st_size > 0, folder / name
    assert not list(out.rglob("*.tmp")), "temporary files left behind"

    pred = pd.read_csv(out / "predictions.csv")
    test = pd.read_csv(data / "test.csv")
    assert list(pred.columns) == ["image", "true", "predicted", *[f"prob_{c}" for c in CLASSES]]
    assert pred["image"].tolist() == test["image"].tolist()
    assert pred["true"].tolist() == [CLASSES[i] for i in test["label"]]
    probs = pred.filter(like="prob_").to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (pred["predicted"] == np.asarray(CLASSES)[probs.argmax(axis=1)]).all()
    assert metrics["accuracy"] == pytest.approx((pred["true"] == pred["predicted"]).mean())
    raw = pd.read_csv(out / "raw" / "predictions.csv").filter(like="prob_").to_numpy()
    assert not np.allclose(raw, probs), "raw and EMA weights gave the same predictions"

    per_class = pd.read_csv(out / "per_class.csv")
    assert per_class.columns.tolist() == ["class", "precision", "recall", "f1", "auc", "support"]
    assert per_class["support"].sum() == N_IMAGES
    roc = pd.read_csv(out / "roc.csv")
    assert roc.columns.tolist() == ["fpr", *CLASSES]

    kfp = kfp_outputs(out)
    assert dict(kfp["scalars"])["balanced_accuracy"] == metrics["balanced_accuracy"]
    assert kfp["confusion_matrix"]["matrix"] == metrics["confusion_matrix"]
    assert len(kfp["roc"]["fpr"]) == len(kfp["roc"]["threshold"])


def test_ema_only_file_and_cli(data, tmp_path):
    save_checkpoint(tmp_path / "ema_weights.pt", weights=("ema",))
    out = tmp_path / "eval"
    rc = evaluate.main(["--model", str(tmp_path), "--test_csv", str(data / "test.csv"),
                        "--img_dir", str(data / "images"), "--out", str(out), "--bootstrap",
                        "10", "--num_workers", "0", "--tta", "--no-mlflow"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["weights"] == "ema" and metrics["tta"] is True and "raw" not in metrics
    probs = pd.read_csv(out / "predictions.csv").filter(like="prob_").to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert not (out / "raw").exists()
    # the training summary beside ema_weights.pt names the MLflow run
    (tmp_path / "training_summary.json").write_text(json.dumps({"mlflow_run_id": "abc"}))
    assert evaluate.load_models(str(tmp_path))[1]["mlflow_run_id"] == "abc"


def test_tta_is_flip_invariant():
    model = _tiny_model(0)
    x = torch.randn(2, 3, IMG_SIZE, IMG_SIZE)
    batches = [(x, None), (x.flip(-1), None), (x.flip(-2), None)]
    probs = evaluate.predict({"m": model}, batches, torch.device("cpu"), tta=True)["m"]
    np.testing.assert_allclose(probs[:2], probs[2:4], atol=1e-5)
    np.testing.assert_allclose(probs[:2], probs[4:], atol=1e-5)
    plain = evaluate.predict({"m": model}, batches[:2], torch.device("cpu"))["m"]
    assert not np.allclose(plain[:2], plain[2:], atol=1e-5)


def test_bad_test_csv_names_the_row(data, tmp_path):
    bad = pd.read_csv(data / "test.csv", dtype=str)
    bad.loc[3, "label"] = "MELANOMA"
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match=r"bad\.csv\W+(row|line) 5"):
        evaluate.run(data / "checkpoint_last.pt", tmp_path / "bad.csv", data / "images",
                     tmp_path / "o", use_mlflow=False)


def test_missing_image_is_named(data, tmp_path):
    bad = pd.read_csv(data / "test.csv")
    bad.loc[0, "image"] = "ISIC_missing"
    bad.to_csv(tmp_path / "missing.csv", index=False)
    with pytest.raises((FileNotFoundError, ValueError), match="ISIC_missing"):
        evaluate.run(data / "checkpoint_last.pt", tmp_path / "missing.csv", data / "images",
                     tmp_path / "o", use_mlflow=False)


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """A file-based MLflow store (SQLite) as MLFLOW_TRACKING_URI, with one training run."""
    import mlflow

    store = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(store)  # a SQLite store keeps artifacts in ./mlruns: not in the checkout
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("evaluate-tests")  # not an experiment id an earlier test made active
        with mlflow.start_run() as training:
            mlflow.log_param("train.img_size", IMG_SIZE)
        yield training.info.run_id


def test_logs_into_the_training_run(data, tmp_path, mlflow_store):
    import mlflow

    ckpt = save_checkpoint(tmp_path / "ckpt.pt", mlflow_run_id=mlflow_store)
    summary = _run(data, tmp_path / "eval", model=ckpt, use_mlflow=True, bootstrap=5)
    assert summary["mlflow_run_id"] == mlflow_store
    logged = mlflow.get_run(mlflow_store).data.metrics
    assert logged["test_balanced_accuracy"] == summary["balanced_accuracy"]
    assert logged["test_raw_balanced_accuracy"] == summary["raw_balanced_accuracy"]
    assert "test_accuracy_ci_low" in logged and "test_roc_auc_MEL" in logged
    note = mlflow.get_run(mlflow_store).data.tags["mlflow.note.content"]
    ci = json.loads((tmp_path / "eval" / "metrics.json").read_text())["ci95"]["balanced_accuracy"]
    assert f"balanced accuracy: {summary['balanced_accuracy']:.3f} [{ci['low']:.3f}," in note
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(mlflow_store, "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/roc.png", "evaluation/raw"} <= artifacts

    # a run id this store does not know: a new evaluation run, tagged with it
    ckpt = save_checkpoint(tmp_path / "other.pt", mlflow_run_id="0" * 32)
    summary = _run(data, tmp_path / "eval2", model=ckpt, use_mlflow=True, bootstrap=5)
    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.data.tags["training_run_id"] == "0" * 32
    assert run.data.metrics["test_n_images"] == N_IMAGES


def test_registered_model_uri_scores_like_the_checkpoint(data, tmp_path, mlflow_store):
    """The served model (registry/pyfunc.py, as training logs it) scores like the checkpoint."""
    import mlflow

    from components.registry import pyfunc

    with mlflow.start_run() as active:
        run_id = active.info.run_id
    _, meta = checkpoint.load_model(data / "checkpoint_last.pt", which="ema")
    uri, _ = pyfunc.log_model(run_id, _tiny_model(1).state_dict(), meta)  # the EMA weights
    summary = _run(data, tmp_path / "eval", model=uri, bootstrap=5)
    assert summary["weights"] == "ema" and "raw_accuracy" not in summary
    logged = pd.read_csv(tmp_path / "eval" / "predictions.csv").filter(like="prob_")
    _run(data, tmp_path / "ckpt", bootstrap=5)
    ckpt = pd.read_csv(tmp_path / "ckpt" / "predictions.csv").filter(like="prob_")
    np.testing.assert_allclose(logged.to_numpy(), ckpt.to_numpy(), atol=1e-5)
    digests = [json.loads((tmp_path / d / "metrics.json").read_text())["weights_digest"]
               for d in ("eval", "ckpt")]
    assert digests[0] == digests[1]  # the same EMA tensors, whatever file held them


def test_non_finite_weights_are_refused(data, tmp_path, capsys):
    model = _tiny_model(0)
    state = {"model_config": model.config, "classes": list(CLASSES), "img_size": IMG_SIZE,
             "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    weights = model.state_dict()
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = torch.full_like(weights[name], float("nan"))  # a diverged training
    checkpoint.save(tmp_path / "nan.pt", {**state, "ema": weights})
    assert evaluate.main(["--model", str(tmp_path / "nan.pt"), "--test_csv", str(data / "test.csv"),
                          "--img_dir", str(data / "images"), "--out", str(tmp_path / "o"),
                          "--no_mlflow"]) == 1
    assert "NaN or inf" in capsys.readouterr().err
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_metrics_record_what_was_scored_and_the_melanoma_operating_point(data, tmp_path):
    _run(data, tmp_path / "e", melanoma_specificity=0.8)
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    state = checkpoint.load(data / "checkpoint_last.pt")
    assert metrics["weights_digest"] == checkpoint.weights_digest(state["ema"])
    point = metrics["melanoma_operating_point"]
    assert point["target_specificity"] == 0.8 and point["specificity"] >= 0.8
    assert point["n_positive"] == N_IMAGES // len(CLASSES)
    headline = json.loads((tmp_path / "e" / "headline.json").read_text())
    assert headline["balanced_accuracy"] == round(metrics["balanced_accuracy"], 4)
    assert headline["melanoma_sensitivity"] == round(point["sensitivity"], 4)
    assert "confusion_matrix" not in headline and len(headline) <= 16


def test_per_source_metrics_when_the_test_set_has_several_sources(data, tmp_path):
    test = pd.read_csv(data / "test.csv")
    test["source"] = np.where(np.arange(len(test)) < 16, "SITE_A", "SITE_B")
    test.to_csv(tmp_path / "test.csv", index=False)
    evaluate.run(data / "checkpoint_last.pt", tmp_path / "test.csv", data / "images",
                 tmp_path / "e", config=EvaluateConfig(bootstrap=20, batch_size=8),
                 use_mlflow=False)
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    per_source = metrics["per_source"]
    assert set(per_source) == {"SITE_A", "SITE_B"}
    assert [per_source[s]["n_images"] for s in ("SITE_A", "SITE_B")] == [16, N_IMAGES - 16]
    preds = pd.read_csv(tmp_path / "e" / "predictions.csv").iloc[:16]
    assert per_source["SITE_A"]["accuracy"] == pytest.approx((preds["true"] == preds["predicted"]).mean())
    for s in per_source.values():
        ci = s["ci95"]["balanced_accuracy"]
        assert ci["low"] <= s["balanced_accuracy"] <= ci["high"]
    scalars = dict(kfp_outputs(tmp_path / "e")["scalars"])
    assert scalars["SITE_B_balanced_accuracy"] == per_source["SITE_B"]["balanced_accuracy"]
    cross_site = metrics["cross_site"]["tasks"]["mel_vs_nv"]   # evaluation/sites.py
    assert set(cross_site["within"]) == {"SITE_A", "SITE_B"}
    assert cross_site["pooled"]["n_positive"] == N_IMAGES // len(CLASSES)
    assert len(metrics["cross_site"]["summary"]) == 2
    _run(data, tmp_path / "one")  # one source (none given): no per-source section
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert "per_source" not in one and "cross_site" not in one
    # no source column: the lesion id's prefix names the source, as split does
    test = test.drop(columns="source")
    test["lesion_id"] = np.where(np.arange(len(test)) < 16, "BCN_", "HAM_") + test["lesion_id"]
    test.to_csv(tmp_path / "test.csv", index=False)
    evaluate.run(data / "checkpoint_last.pt", tmp_path / "test.csv", data / "images",
                 tmp_path / "p", config=EvaluateConfig(bootstrap=0, batch_size=8),
                 use_mlflow=False)
    metrics = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert set(metrics["per_source"]) == set(metrics["cross_site"]["tasks"]["mel_vs_rest"][
        "within"]) == {"BCN", "HAM"}
