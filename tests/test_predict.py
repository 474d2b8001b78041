"""predict and the pyfunc serving model, on a model folder saved exactly as register logs it:
paths / bytes / base64 in, per-image errors, the CLI's three input forms, preprocessing equal
to evaluation's, and more rows than one request takes."""
from __future__ import annotations

import base64
import io
import os
import resource
import signal
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from components.common import decisions
from components.common.labels import CLASSES
from components.registry import serving
from components.commands import predict
from components.training.transforms import eval_transform
from conftest import TINY_IMG
from procs import run_group


@pytest.fixture(scope="module")
def pyfunc(model_dir):
    """The model as `skinlesion predict` loads it: local paths allowed."""
    return mlflow.pyfunc.load_model(str(model_dir), model_config={"allow_paths": True})


def test_pyfunc_takes_paths_bytes_and_base64(pyfunc, images):
    data = images["a.jpg"].read_bytes()
    table = pd.DataFrame({"image": [str(images["a.jpg"]), data, base64.b64encode(data).decode(),
                                    "data:image/jpeg;base64," + base64.b64encode(data).decode()]})
    out = pyfunc.predict(table)
    assert list(out.columns) == [*CLASSES, *(name for name, _ in serving.ANSWER_COLUMNS)]
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


@pytest.fixture(scope="module")
def folder_of_300(tmp_path_factory) -> Path:
    """300 tiny PNGs: more than the served model's 256 rows per request."""
    folder = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(3)
    for i in range(300):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"im{i:03d}.png")
    return folder


def test_a_folder_over_the_row_limit_is_predicted_in_requests(model_dir, folder_of_300, tmp_path):
    """Issue 24 #11: 300 images failed as '300 rows in one request', blaming the model."""
    out = tmp_path / "new" / "pred.csv"  # a folder that does not exist yet is made
    assert predict.main(["--model", str(model_dir), "--dir", str(folder_of_300), "--out", str(out)]) == 0
    table = pd.read_csv(out, keep_default_na=False)
    assert [Path(p).name for p in table["image"]] == [f"im{i:03d}.png" for i in range(300)]
    assert (table["error"] == "").all() and not Path(f"{out}.partial").exists()


def test_a_run_stopped_midway_keeps_the_requests_done(model_dir, folder_of_300, tmp_path):
    """A full disk (RLIMIT_FSIZE: room for 1.5 requests of 100 rows) stops the run after the first
    request: OUT.partial holds its 100 rows, a valid CSV, and nothing is at OUT."""
    out = tmp_path / "pred.csv"
    # path, 8 probabilities, class, flags, reason (no calibration file), version, error
    row = len(str(folder_of_300 / "im000.png")) + 90 + len(decisions.NO_FILE)
    room = 100 + 150 * row

    def full_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (room, room))

    proc = run_group([sys.executable, "-m", "components.commands.cli", "predict", "--model",
                      str(model_dir), "--dir", str(folder_of_300), "--out", str(out),
                      "--batch_size", "100"], timeout=120, preexec_fn=full_disk,
                     env={**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "stopped after 100 of 300 images" in proc.stderr and f"{out}.partial" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
    kept = pd.read_csv(f"{out}.partial", keep_default_na=False)
    assert [Path(p).name for p in kept["image"]] == [f"im{i:03d}.png" for i in range(100)]
    assert (kept["error"] == "").all() and set(kept["predicted"]) <= set(CLASSES)
