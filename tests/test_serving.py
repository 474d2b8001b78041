"""The served model through a real `skinlesion serve` process (MLflow's scoring server), tried
as an attacker and a careless client would: no file is read, no path's existence is revealed,
no object repr is echoed, every limit answers with a clear error, the JSON is valid (null, not
NaN), and a good base64 image is scored."""
from __future__ import annotations

import base64
import io
import json
import os
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from components.common.labels import CLASSES
from procs import free_port, serve

MAX_ROWS, MAX_BYTES, MAX_PIXELS = 4, 50_000, 1_000_000


def _strict_json(text: str):
    def refuse(token):
        raise ValueError(f"not JSON: bare {token}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = free_port()
    env = {"SKINLESION_SERVING_MAX_ROWS": str(MAX_ROWS),
           "SKINLESION_SERVING_MAX_IMAGE_BYTES": str(MAX_BYTES),
           "SKINLESION_SERVING_MAX_PIXELS": str(MAX_PIXELS),
           # nothing activated: only the interpreter's absolute path is known
           "PATH": "/usr/bin:/bin", "SKINLESION_SERVING_ALLOW_PATHS": "",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    cmd = [sys.executable, "-m", "components.tools.cli", "serve", "--model", str(model_dir),
           "--port", str(port)]
    with serve(cmd, f"http://127.0.0.1:{port}/ping",
               tmp_path_factory.mktemp("serve") / "serve.log", timeout=300,
               env={**os.environ, **env}):
        yield f"http://127.0.0.1:{port}/invocations"


def _post(url: str, rows: list, params: dict | None = None) -> tuple[int, str]:
    payload = {"dataframe_split": {"columns": ["image"], "data": [[r] for r in rows]}}
    if params:
        payload["params"] = params
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_a_base64_image_is_scored_as_valid_json(server, images):
    """(The server started with PATH=/usr/bin:/bin: `skinlesion serve` finds uvicorn itself.)"""
    status, text = _post(server, [_b64(images["a.jpg"].read_bytes()),
                                  "data:image/png;base64," + _b64(images["b.png"].read_bytes())])
    assert status == 200
    rows = _strict_json(text)["predictions"]
    for row in rows:
        assert row["error"] == "" and row["predicted"] in CLASSES
        assert sum(row[c] for c in CLASSES) == pytest.approx(1.0, rel=1e-5)


def test_no_file_is_read_and_no_path_is_revealed(server, images, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2")
    rows = [str(images["a.jpg"]), str(secret), str(tmp_path / "missing.jpg"), "/etc/passwd"]
    status, text = _post(server, rows)
    assert status == 200
    answers = _strict_json(text)["predictions"]
    errors = {row["error"] for row in answers}
    assert errors == {"400 not a base64-encoded image"}, errors  # same for existing and missing
    assert all(row[c] is None for row in answers for c in CLASSES)  # null, not NaN
    assert "hunter2" not in text and "object at 0x" not in text and "secret" not in text


def test_undecodable_bytes_get_a_fixed_sentence(server):
    status, text = _post(server, [_b64(b"\xff\xd8 not really a jpeg"), _b64(b"#!/bin/sh\n")])
    assert status == 200
    assert [r["error"] for r in _strict_json(text)["predictions"]] == \
        ["400 not a decodable image"] * 2
    assert "BytesIO" not in text and "0x" not in text


def test_limits_answer_with_clear_errors(server):
    noise = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")  # incompressible: > MAX_BYTES
    big = buffer.getvalue()
    assert len(big) > MAX_BYTES
    flat = io.BytesIO()
    Image.new("RGB", (1200, 1000)).save(flat, format="PNG")  # small file, 1.2 MP decoded
    status, text = _post(server, [_b64(big), _b64(flat.getvalue())])
    assert status == 200
    errors = [r["error"] for r in _strict_json(text)["predictions"]]
    assert errors[0].startswith("413 image too large") and f"{MAX_BYTES:,}" in errors[0]
    assert errors[1].startswith("413 image too large: over 1,000,000 pixels")

    status, text = _post(server, ["x"] * (MAX_ROWS + 1))
    assert status == 400 and f"the limit is {MAX_ROWS}" in text
    status, text = _post(server, ["x"], params={"batch_size": -1})
    assert status == 400 and "batch_size must be an integer of at least 1" in text


def test_serve_turns_off_mlflows_download_progress_lines(monkeypatch):
    """(One progress line per file fetched from the registry: 59 for this model.)"""
    from components.tools import serve as serve_command

    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    assert serve_command.environment()["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
