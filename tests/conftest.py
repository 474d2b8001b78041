"""Shared fixtures: real services (an MLflow server, a moto S3 endpoint) started once per
session, and the real data in ../shared/data (tests that use it skip cleanly when it is
absent)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from components.common.labels import CLASSES
from components.registry import pyfunc as registry_pyfunc
from components.registry import serving
from components.training.transforms import IMAGENET_MEAN, IMAGENET_STD
from model import HybridConvNeXtV2

from mlflow_server import start_mlflow_server
from s3server import moto_s3_server

TINY_IMG = 32

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# Two cores on CI: keep torch from oversubscribing them when pytest runs a subprocess too.
torch.set_num_threads(2)
# MLflow's usage telemetry (a background thread that edits os.environ while urllib reads it:
# a KeyError seen here) has no network to reach anyway.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """The http URI of a real `mlflow server` process (one per test session)."""
    with start_mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as uri:
        yield uri


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a moto S3 server shared by the whole test session."""
    with moto_s3_server() as url:
        yield url


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A pyfunc model folder (what the registry stores), built from a tiny random model
    (input 32 px, prepared at 40)."""
    root = tmp_path_factory.mktemp("pyfunc")
    torch.manual_seed(0)
    net = HybridConvNeXtV2(num_classes=len(CLASSES), preset="tiny").eval()
    meta = {"model_config": net.config, "classes": list(CLASSES), "img_size": TINY_IMG,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    artifacts = serving.write_artifacts(net.state_dict(), {**meta, "prepare_size": 40}, root / "staging")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow's advice to add an input example
        mlflow.pyfunc.save_model(str(root / "model"), **registry_pyfunc.pyfunc_kwargs(artifacts, list(CLASSES)))
    return root / "model"


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, Path]:
    """Three small images (JPEG, PNG, upper-case suffix), a text file and a broken JPEG."""
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
