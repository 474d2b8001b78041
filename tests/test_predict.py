"""predict and the pyfunc serving model, on a model folder saved exactly as register logs it:
paths / bytes / base64 in, per-image errors, the CLI's three input forms, preprocessing equal
to evaluation's, and `mlflow models serve` answering JSON."""
from __future__ import annotations

import base64
import io
import json
import os
import sys
import urllib.request
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from components import predict, register, serving
from components.labels import CLASSES
from components.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from model import HybridConvNeXtV2
from procs import free_port, serve

TINY = dict(dims=(16, 32, 48, 64), depths=(1, 1, 1, 1))
IMG = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A pyfunc model folder (what the registry stores), built from a tiny random model."""
    root = tmp_path_factory.mktemp("pyfunc")
    torch.manual_seed(0)
    net = HybridConvNeXtV2(num_classes=len(CLASSES), preset="paper", **TINY).eval()
    meta = {"model_config": net.config, "classes": list(CLASSES), "img_size": IMG,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    artifacts = serving.write_artifacts(net.state_dict(), meta, root / "staging", prepare_size=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow's advice to add an input example
        mlflow.pyfunc.save_model(str(root / "model"), **register.pyfunc_kwargs(artifacts, list(CLASSES)))
    return root / "model"


@pytest.fixture(scope="module")
def pyfunc(model_dir):
    return mlflow.pyfunc.load_model(str(model_dir))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    out = {}
    for name, size in (("a.jpg", (60, 45)), ("b.png", (40, 40)), ("c.JPG", (200, 150))):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            folder / name, format="PNG" if name.endswith("png") else "JPEG")
        out[name] = folder / name
    (folder / "notes.txt").write_text("not an image")
    out["bad"] = folder / "broken.jpg"
    out["bad"].write_bytes(b"\xff\xd8 this is not really a jpeg")
    return out


def test_pyfunc_takes_paths_bytes_and_base64(pyfunc, images):
    data = images["a.jpg"].read_bytes()
    table = pd.DataFrame({"image": [str(images["a.jpg"]), data, base64.b64encode(data).decode(),
                                    "data:image/jpeg;base64," + base64.b64encode(data).decode()]})
    out = pyfunc.predict(table)
    assert list(out.columns) == [*CLASSES, "predicted", "error"]
    probs = out[list(CLASSES)].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(probs[0], probs[1], rtol=1e-6)
    np.testing.assert_allclose(probs[0], probs[2], rtol=1e-6)
    np.testing.assert_allclose(probs[0], probs[3], rtol=1e-6)
    assert (out["predicted"] == CLASSES[int(probs[0].argmax())]).all() and (out["error"] == "").all()


def test_bad_rows_get_errors_and_the_rest_is_predicted(pyfunc, images, monkeypatch):
    table = pd.DataFrame({"image": [str(images["bad"]), str(images["b.png"]), "missing.jpg", 42]})
    out = pyfunc.predict(table, params={"batch_size": 1})
    assert "not a decodable image" in out.loc[0, "error"]
    assert out.loc[1, "error"] == "" and out.loc[1, "predicted"] in CLASSES
    assert "no such file" in out.loc[2, "error"] and "int" in out.loc[3, "error"]
    assert out.loc[[0, 2, 3], list(CLASSES)].isna().all().all()
    monkeypatch.setenv("SKINLESION_SERVING_ALLOW_PATHS", "0")
    refused = pyfunc.predict(pd.DataFrame({"image": [str(images["b.png"])]}))
    assert "paths are disabled" in refused.loc[0, "error"]


def test_preprocessing_is_evaluations(model_dir, images):
    """On an image the preprocess step already resized (short side = prepare_size), the
    serving transform gives the very tensor evaluate's eval_transform gives."""
    model = serving.load_local(model_dir)
    prepared = Image.open(images["b.png"]).convert("RGB").resize((40, 40))
    buffer = io.BytesIO()
    prepared.save(buffer, format="PNG")
    got = model.preprocess(buffer.getvalue())
    torch.testing.assert_close(got, eval_transform(IMG)(prepared))


def test_cli_files_dir_and_csv(model_dir, images, tmp_path, capsys):
    out = tmp_path / "pred.csv"
    files = [str(images["a.jpg"]), str(images["bad"]), str(tmp_path / "gone.jpg")]
    rc = predict.main(["--model", str(model_dir), *files, "--out", str(out)])
    assert rc == 1  # some failed, the CSV is still written
    table = pd.read_csv(out, keep_default_na=False)
    assert table["image"].tolist() == files
    assert table.loc[0, "error"] == "" and table.loc[0, "predicted"] in CLASSES
    assert "not a decodable image" in table.loc[1, "error"] and "no such file" in table.loc[2, "error"]
    err = capsys.readouterr().err
    assert f"{images['bad']}: not a decodable image" in err and "predicted 1/3 images" in err

    assert predict.main(["--model", str(model_dir), "--dir", str(images["a.jpg"].parent),
                         "--out", str(out)]) == 1  # broken.jpg is in the folder
    by_dir = pd.read_csv(out, keep_default_na=False)
    assert sorted(Path(p).name for p in by_dir["image"]) == ["a.jpg", "b.png", "broken.jpg", "c.JPG"]

    ids = tmp_path / "test.csv"
    pd.DataFrame({"image": ["a", "c", "b"], "label": [0, 1, 2]}).to_csv(ids, index=False)
    assert predict.main(["--model", str(model_dir), "--csv", str(ids), "--dir",
                         str(images["a.jpg"].parent)]) == 0
    stdout = capsys.readouterr().out
    printed = pd.read_csv(io.StringIO(stdout), keep_default_na=False)
    assert [Path(p).name for p in printed["image"]] == ["a.jpg", "c.JPG", "b.png"]
    assert (printed["error"] == "").all()


def test_cli_usage_errors(model_dir):
    with pytest.raises(SystemExit) as err:
        predict.main(["--model", str(model_dir)])
    assert err.value.code == 2


def test_mlflow_models_serve_answers_base64_json(model_dir, images, tmp_path):
    """`mlflow models serve` on the model folder (env-manager local) scores base64 images."""
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    # the scoring server is exec'd as `uvicorn` from PATH: the venv's bin folder
    env = {**os.environ, "SKINLESION_SERVING_ALLOW_PATHS": "0",
           "PATH": f"{mlflow_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(mlflow_bin), "models", "serve", "-m", str(model_dir), "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with serve(cmd, f"http://127.0.0.1:{port}/ping", tmp_path / "serve.log", env=env):
        payload = {"dataframe_split": {"columns": ["image"], "data": [
            [base64.b64encode(images["a.jpg"].read_bytes()).decode()],
            [str(images["a.jpg"])]]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            rows = json.loads(reply.read())["predictions"]
        assert rows[0]["predicted"] in CLASSES and rows[0]["error"] == ""
        assert sum(rows[0][c] for c in CLASSES) == pytest.approx(1.0, rel=1e-5)
        assert "paths are disabled" in rows[1]["error"] and rows[1]["predicted"] == ""


def test_cli_names_a_model_that_does_not_load(tmp_path, images, capsys):
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    rc = predict.main(["--model", "models:/no-such-model@champion", "--tracking-uri", uri,
                       str(images["a.jpg"])])
    assert rc == 2 and "cannot load models:/no-such-model@champion" in capsys.readouterr().err
