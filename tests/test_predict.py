"""predict and the pyfunc serving model, on a model folder saved exactly as register logs it:
paths / bytes / base64 in, per-image errors, the CLI's three input forms, preprocessing equal
to evaluation's, and `mlflow models serve` answering JSON."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from components.common.labels import CLASSES
from components.registry import serving
from components.tools import predict
from components.training.transforms import eval_transform
from conftest import TINY_IMG



@pytest.fixture(scope="module")
def pyfunc(model_dir):
    """The model as `skinlesion predict` loads it: local paths allowed."""
    return mlflow.pyfunc.load_model(str(model_dir), model_config={"allow_paths": True})


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


def test_bad_rows_get_errors_and_the_rest_is_predicted(pyfunc, images):
    table = pd.DataFrame({"image": [str(images["bad"]), str(images["b.png"]), "missing.jpg", 42]})
    out = pyfunc.predict(table, params={"batch_size": 1})
    assert "not a decodable image" in out.loc[0, "error"]
    assert out.loc[1, "error"] == "" and out.loc[1, "predicted"] in CLASSES
    assert "not a base64-encoded image, nor a readable file" in out.loc[2, "error"]
    assert "expected image bytes" in out.loc[3, "error"]
    assert out.loc[[0, 2, 3], list(CLASSES)].isna().all().all()
    # the served model (paths off) answers differently: tests/test_serving.py


def test_preprocessing_is_evaluations(model_dir, images):
    """On an image the preprocess step already resized (short side = prepare_size), the
    serving transform gives the very tensor evaluate's eval_transform gives."""
    model = serving.load_local(model_dir)
    prepared = Image.open(images["b.png"]).convert("RGB").resize((40, 40))
    buffer = io.BytesIO()
    prepared.save(buffer, format="PNG")
    got = model.preprocess(buffer.getvalue())
    torch.testing.assert_close(got, eval_transform(TINY_IMG)(prepared))


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
    assert f"{images['bad']}: 400 not a decodable image" in err and "predicted 1/3 images" in err

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


def test_cli_names_a_model_that_does_not_load(tmp_path, images, capsys):
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    rc = predict.main(["--model", "models:/no-such-model@champion", "--tracking-uri", uri,
                       str(images["a.jpg"])])
    assert rc == 2 and "cannot load models:/no-such-model@champion" in capsys.readouterr().err


def test_more_images_than_a_scoring_request_may_hold_are_sent_a_batch_at_a_time(
        model_dir, images, monkeypatch):
    """(The demo's suggested `predict --dir` holds 400 images; a request may hold 256.)"""
    monkeypatch.setenv("SKINLESION_SERVING_MAX_ROWS", "4")
    result = predict.run(str(model_dir), [str(images["a.jpg"])] * 10, batch_size=4)
    assert result["n_images"] == 10 and result["n_failed"] == 0
    assert result["table"]["predicted"].nunique() == 1  # the same image, the same answer
