"""The registered model: an `mlflow.pyfunc` PythonModel around the EMA weights.

Why not `mlflow.pytorch`: it pickles whole modules, while our rule is that weights load with
`torch.load(weights_only=True)` (or safetensors, which has no pickle at all), and serving must
take image files or bytes, not tensors. This file is logged as *model code* ("models from
code": MLflow stores the file itself, never a pickle of the object) next to two artifacts:

    weights          weights.safetensors  the EMA state dict (safetensors: no pickle)
    preprocessing    preprocessing.json   {"format", "model_config", "classes", "img_size",
                                           "resize_size", "prepare_size", "mean", "std",
                                           "interpolation", "source"}

and the `model/` and `components/` packages as code paths, so the model directory loads in a
process that has only torch, torchvision, timm, Pillow, pandas, safetensors and mlflow.

Input (``predict``): a DataFrame with a column ``image`` (or, without one, its first column);
each value is a file path, raw encoded bytes (JPEG/PNG/...), or a base64 string of those bytes
(plain or a `data:image/...;base64,` URI: the way to send images through `mlflow models
serve` JSON). Params: ``batch_size`` (32).

Output: a DataFrame, one row per input row, in input order: one float column per class (the
softmax probabilities, classes in training order), ``predicted`` (the top class name) and
``error`` ("" when the row was predicted; otherwise why not, with probabilities NaN and
``predicted`` ""). A bad image never fails the other rows.

Preprocessing is the pipeline's, read from preprocessing.json: decode, EXIF-rotate, RGB,
resize the short side to `prepare_size` (what the preprocess step did to training images:
Pillow LANCZOS, JPEG draft), then the evaluation transform (resize the short side to
`resize_size`, centre-crop `img_size`, scale to [0, 1], normalise with mean/std).

Reading file paths is allowed by default (in-process use, `skinlesion predict`). When the
model is served to anyone who should not read the server's files, set
SKINLESION_SERVING_ALLOW_PATHS=0: then only bytes / base64 are accepted.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import os
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

PREPROCESSING_FORMAT = "skinlesion-pyfunc/1"
WEIGHTS_FILE = "weights.safetensors"
PREPROCESSING_FILE = "preprocessing.json"
INPUT_COLUMN = "image"
DEFAULT_BATCH_SIZE = 32


class ImageInputError(ValueError):
    """One input row that cannot become an image (its message goes into the `error` column)."""


# ---------------------------------------------------------------- artifacts (write side)

def write_artifacts(state_dict: dict[str, torch.Tensor], meta: dict, out_dir: str | os.PathLike,
                    *, prepare_size: int | None = None, source: str = "") -> dict[str, str]:
    """Write weights.safetensors + preprocessing.json into `out_dir`; return the pyfunc
    `artifacts` mapping {"weights": path, "preprocessing": path}.

    `meta` needs model_config, classes, img_size, mean, std (what checkpoint.load_model gives).
    """
    from safetensors.torch import save_file

    for key in ("model_config", "classes", "img_size", "mean", "std"):
        if meta.get(key) is None:
            raise ValueError(f"model metadata lacks {key!r} (got keys {sorted(meta)})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    img_size = int(meta["img_size"])
    resize = round(img_size * 256 / 224)  # components.transforms.resize_size
    preprocessing = {
        "format": PREPROCESSING_FORMAT,
        "model_config": _jsonable(meta["model_config"]),
        "classes": list(meta["classes"]),
        "img_size": img_size,
        "resize_size": resize,
        "prepare_size": int(prepare_size) if prepare_size else resize,
        "mean": [float(v) for v in meta["mean"]],
        "std": [float(v) for v in meta["std"]],
        "interpolation": "bilinear",
        "source": source,
    }
    weights = out_dir / WEIGHTS_FILE
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(weights))
    (out_dir / PREPROCESSING_FILE).write_text(json.dumps(preprocessing, indent=2) + "\n")
    return {"weights": str(weights), "preprocessing": str(out_dir / PREPROCESSING_FILE)}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def signature(classes: list[str]):
    """The pyfunc signature: `image` (any: path, bytes or base64) in; probabilities out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec(AnyType(), INPUT_COLUMN)])
    outputs = Schema([ColSpec("double", c) for c in classes]
                     + [ColSpec("string", "predicted"), ColSpec("string", "error")])
    params = ParamSchema([ParamSpec("batch_size", "long", DEFAULT_BATCH_SIZE)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


# ---------------------------------------------------------------- the model (read side)

class SkinLesionClassifier(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: image paths / bytes / base64 in, class probabilities out."""

    def load_context(self, context) -> None:
        self.load(context.artifacts["weights"], context.artifacts["preprocessing"])

    def load(self, weights: str | os.PathLike, preprocessing: str | os.PathLike,
             device: str | None = None) -> "SkinLesionClassifier":
        """Build the network from preprocessing.json and load the safetensors weights."""
        from safetensors.torch import load_file
        from torchvision.transforms import v2

        from model import HybridConvNeXtV2

        self.info = json.loads(Path(preprocessing).read_text())
        if self.info.get("format") != PREPROCESSING_FORMAT:
            raise ValueError(f"{preprocessing}: not a {PREPROCESSING_FORMAT} file")
        self.classes = list(self.info["classes"])
        device = device or os.environ.get("SKINLESION_DEVICE") or (
            "cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        net = HybridConvNeXtV2(**{**self.info["model_config"], "pretrained": False})
        net.load_state_dict(load_file(str(weights), device="cpu"))  # strict: every key
        self.net = net.to(self.device).eval()
        # Same ops as components.transforms.eval_transform, with the stored mean/std.
        self.transform = v2.Compose([
            v2.Resize(int(self.info["resize_size"]), antialias=True),
            v2.CenterCrop(int(self.info["img_size"])),
            v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(self.info["mean"], self.info["std"]),
        ])
        return self

    # -- input decoding

    def _image_bytes(self, value: Any) -> bytes:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value:
            raise ImageInputError(f"expected a path, bytes or base64 string, got {type(value).__name__}")
        allow_paths = os.environ.get("SKINLESION_SERVING_ALLOW_PATHS", "1") not in ("0", "false", "no")
        if allow_paths and len(value) < 4096 and os.path.isfile(value):
            try:
                return Path(value).read_bytes()
            except OSError as err:
                raise ImageInputError(f"cannot read {value}: {err}") from None
        if value.startswith("data:") and "," in value:  # data:image/jpeg;base64,...
            value = value.split(",", 1)[1]
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            pass
        if allow_paths:
            raise ImageInputError(f"no such file, and not base64: {value[:200]!r}")
        raise ImageInputError("not base64 (file paths are disabled: SKINLESION_SERVING_ALLOW_PATHS=0)")

    def preprocess(self, value: Any) -> torch.Tensor:
        """One input value -> normalised CHW tensor; ImageInputError when it is not an image."""
        from PIL import Image

        from components.preprocess import CorruptImageError, prepare_image

        data = self._image_bytes(value)
        try:
            image, _ = prepare_image(data, int(self.info["prepare_size"]))
        except (CorruptImageError, Image.UnidentifiedImageError, OSError, ValueError) as err:
            raise ImageInputError(f"not a decodable image: {err}") from None
        return self.transform(image)

    # -- prediction

    def predict(self, context, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        values = _column(model_input)
        batch_size = int((params or {}).get("batch_size") or DEFAULT_BATCH_SIZE)
        probs = np.full((len(values), len(self.classes)), np.nan, dtype=np.float64)
        errors = [""] * len(values)
        for start in range(0, len(values), max(1, batch_size)):
            tensors, rows = [], []
            for i in range(start, min(start + batch_size, len(values))):
                try:
                    tensors.append(self.preprocess(values[i]))
                    rows.append(i)
                except ImageInputError as err:
                    errors[i] = str(err)
            if tensors:
                probs[rows] = self.predict_tensor(torch.stack(tensors))
        out = pd.DataFrame(probs, columns=self.classes)
        out["predicted"] = [self.classes[int(np.argmax(p))] if not e else ""
                            for p, e in zip(probs, errors)]
        out["error"] = errors
        return out

    @torch.inference_mode()
    def predict_tensor(self, batch: torch.Tensor) -> np.ndarray:
        """Softmax probabilities of a preprocessed batch (N, 3, H, W) as float64 (N, classes)."""
        logits = self.net(batch.to(self.device))
        return torch.softmax(logits.float(), dim=1).cpu().numpy().astype(np.float64)


def _column(model_input) -> list:
    """The image values of a pyfunc input: DataFrame (column `image` or the first), Series,
    list, dict of lists, or one value."""
    if isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] == 0:
            return []
        column = INPUT_COLUMN if INPUT_COLUMN in model_input.columns else model_input.columns[0]
        return model_input[column].tolist()
    if isinstance(model_input, pd.Series):
        return model_input.tolist()
    if isinstance(model_input, dict):
        value = model_input.get(INPUT_COLUMN, next(iter(model_input.values()), []))
        return list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    if isinstance(model_input, (list, tuple, np.ndarray)):
        return list(model_input)
    return [model_input]


def load_local(model_dir: str | os.PathLike, device: str | None = None) -> SkinLesionClassifier:
    """Load a downloaded model directory (or a folder with the two artifacts) without MLflow's
    pyfunc wrapper: for benchmarks and tests."""
    model_dir = Path(model_dir)
    for folder in (model_dir, model_dir / "artifacts"):
        if (folder / WEIGHTS_FILE).is_file():
            return SkinLesionClassifier().load(folder / WEIGHTS_FILE, folder / PREPROCESSING_FILE, device)
    raise FileNotFoundError(f"no {WEIGHTS_FILE} in {model_dir} or {model_dir / 'artifacts'}")


# MLflow "models from code": when MLflow executes this file (as code_model_<uuid>) to log or to
# load the model, hand it the model object. A plain `import components.serving` does not.
if not __name__.startswith("components."):
    mlflow.models.set_model(SkinLesionClassifier())
