"""The registered model: an `mlflow.pyfunc` PythonModel around the EMA weights.

Why not `mlflow.pytorch`: it pickles whole modules, while our rule is that weights load with
`torch.load(weights_only=True)` (or safetensors, which has no pickle at all), and serving must
take image files or bytes, not tensors. This file is logged as *model code* ("models from
code": MLflow stores the file itself, never a pickle of the object) next to its artifacts:

    weights          weights.safetensors  the EMA state dict (safetensors: no pickle)
    preprocessing    preprocessing.json   {"format", "model_config", "classes", "img_size",
                                           "resize_size", "prepare_size", "color_constancy",
                                           "minkowski_p", "mean", "std", "interpolation",
                                           "source", "weights_digest"}
    calibration      calibration.json     temperature, decision and OOD thresholds fitted on
                     (when fitted)        validation (components/common/decisions.py)
    ood_stats        ood_stats.safetensors  its OOD statistics (training split), no pickle

and the `model/` and `components/` packages as code paths, so the model directory loads in a
process that has only torch, torchvision, timm, Pillow, pandas, safetensors and mlflow.

Input (``predict``): a DataFrame with a column ``image`` (or, without one, its first column);
each value is raw encoded bytes (JPEG/PNG/...), a base64 string of those bytes (plain or a
`data:image/...;base64,` URI: the way to send images through the scoring server's JSON), or,
where paths are allowed, a file path. Params: ``batch_size`` (32, at least 1).

Output: a DataFrame, one row per input row, in input order (ANSWER_COLUMNS): one float
column per class (the probabilities, temperature-scaled when calibration.json is there; classes
in training order), ``predicted`` (the top class name), ``melanoma_suspected`` and
``malignant_suspected`` (True/False at the thresholds chosen on validation; null when the
image is not in distribution, or the model has no calibration file), ``ood_score`` (the energy
score: Mahalanobis distance of the image's features to the nearest class of the training
split, higher is less like the training images), ``in_distribution``, ``reason`` (why the
flags are null, else ""), ``model_version`` (the weights' sha256 digest: the registered
version's `weights_hash` tag) and ``error`` ("" when the row was predicted; otherwise why not,
with everything else but model_version null and ``predicted`` ""). A bad image never fails the
other rows. Missing values are None rather than NaN, so that the scoring server's JSON has
`null` (bare NaN is not JSON).

Security model of the served model (`skinlesion serve`, or MLflow's scoring server alone):
- no file paths: a string is base64 or an error, whether or not a file of that name exists
  (no file-existence oracle); `skinlesion predict` turns paths on for its own, local use
  (model_config {"allow_paths": true}), and SKINLESION_SERVING_ALLOW_PATHS=1 does for a server
  explicitly meant to read its own disk;
- limits, each an error naming it, all checked from the headers before any row is decoded
  (a JPEG counts at the reduced scale it decodes at): MAX_ROWS rows per request (HTTP 400,
  "request refused: ..."), MAX_IMAGE_BYTES encoded bytes and `max_pixels` decoded pixels per
  image, MAX_REQUEST_PIXELS decoded pixels per request (an error row each); `max_pixels` is
  128 x prepare_size^2 by default: a short side 8 times what the model keeps (aspect up to
  2:1), 64 pixels for each one it uses, and 8 is the largest scale a JPEG decodes at directly;
- one image is decoded at a time; freed memory goes back to the OS after each request;
- error texts are fixed sentences: never an exception's repr, a path or a heap address;
- under `skinlesion serve` (scoring_app.py) work stops at the next row once the request is
  gone (the client hung up, or the server answered 504 after its timeout).
The limits are environment settings SKINLESION_SERVING_<NAME> (MAX_ROWS, MAX_IMAGE_BYTES,
MAX_PIXELS, MAX_REQUEST_PIXELS; the HTTP body's MAX_REQUEST_BYTES is scoring_app.py's).

Preprocessing is the pipeline's, read from preprocessing.json: decode, EXIF-rotate, RGB,
resize the short side to `prepare_size` and apply the colour constancy (what the preprocess
step did to training images, by the same function: components/common/images.py), then the
evaluation transform (resize the short side to `resize_size`, centre-crop `img_size`, scale
to [0, 1], normalise with mean/std).

"""
from __future__ import annotations

import base64
import binascii
import ctypes
import json
import os
import shutil
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from components.common import decisions
from components.registry.request import CURRENT_REQUEST, RequestGone, limit, refused

PREPROCESSING_FORMAT = "skinlesion-pyfunc/1"
ALLOW_PATHS_ENV = "SKINLESION_SERVING_ALLOW_PATHS"
# Limits per request and per image (environment overrides SKINLESION_SERVING_<NAME>, read when
# the model loads; `limit`)
MAX_ROWS = 256
MAX_IMAGE_BYTES = 20 * 2**20       # ISIC's largest JPEGs are about 10 MB
PIXELS_PER_PREPARED = 128          # max_pixels = 128 x prepare_size^2 (module docstring)
# A request of 256 ISIC JPEGs (6000 x 4000, decoded at 1/8: 375k pixels each) is 96 MP; 128 MP
# of PNG decode in about 4 s on one core.
MAX_REQUEST_PIXELS = 128_000_000
WEIGHTS_FILE = "weights.safetensors"
PREPROCESSING_FILE = "preprocessing.json"
CALIBRATION_FILE = "calibration.json"
INPUT_COLUMN = "image"
DEFAULT_BATCH_SIZE = 32


class ImageInputError(ValueError):
    """One input row that cannot become an image (its message goes into the `error` column)."""


# ---------------------------------------------------------------- artifacts (write side)

def write_artifacts(state_dict: dict[str, torch.Tensor], meta: dict, out_dir: str | os.PathLike,
                    *, source: str = "", calibration: str | os.PathLike | None = None
                    ) -> dict[str, str]:
    """Write weights.safetensors + preprocessing.json (and a copy of the `calibration` file
    when it exists) into `out_dir`; return the pyfunc `artifacts` mapping {"weights": path,
    "preprocessing": path[, "calibration": path]}.

    `meta` needs model_config, classes, img_size, mean, std, and has prepare_size when the
    training images came from the preprocess step (what checkpoint.load_model gives), and
    weights_digest (the model_version it answers with).
    """
    from safetensors.torch import save_file

    preprocessing = preprocessing_info(meta, source)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_FILE
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(weights))
    (out_dir / PREPROCESSING_FILE).write_text(json.dumps(preprocessing, indent=2) + "\n")
    artifacts = {"weights": str(weights), "preprocessing": str(out_dir / PREPROCESSING_FILE)}
    if calibration is not None and Path(calibration).is_file():
        decisions.read(calibration)  # refuses files this code did not write
        for key, name in (("calibration", CALIBRATION_FILE), ("ood_stats", decisions.STATS_FILE)):
            shutil.copyfile(Path(calibration).parent / name, out_dir / name)
            artifacts[key] = str(out_dir / name)
    return artifacts


def preprocessing_info(meta: dict, source: str = "") -> dict:
    """What the served model does to an image (preprocessing.json; the model card shows it),
    from a checkpoint's metadata."""
    from components.common.images import resize_size

    for key in ("model_config", "classes", "img_size", "mean", "std"):
        if meta.get(key) is None:
            raise ValueError(f"model metadata lacks {key!r} (got keys {sorted(meta)})")
    img_size = int(meta["img_size"])
    resize = resize_size(img_size)
    return {
        "format": PREPROCESSING_FORMAT,
        "model_config": _jsonable(meta["model_config"]),
        "classes": list(meta["classes"]),
        "img_size": img_size,
        "resize_size": resize,
        "prepare_size": int(meta.get("prepare_size") or resize),
        "color_constancy": meta.get("color_constancy") or "none",
        "minkowski_p": float(meta.get("minkowski_p") or 6.0),
        "mean": [float(v) for v in meta["mean"]],
        "std": [float(v) for v in meta["std"]],
        "interpolation": "bilinear",
        "source": source,
        "weights_digest": meta.get("weights_digest") or "",
    }


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# The answer's columns after the class probabilities, and their types.
ANSWER_COLUMNS = (("predicted", "string"), *((name, "boolean") for name in decisions.DECISIONS),
                  ("ood_score", "double"), ("in_distribution", "boolean"), ("reason", "string"),
                  ("model_version", "string"), ("error", "string"))


def signature(classes: list[str]):
    """The pyfunc signature: `image` (any: path, bytes or base64) in; probabilities out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec(AnyType(), INPUT_COLUMN)])
    outputs = Schema([ColSpec("double", c) for c in classes]
                     + [ColSpec(kind, name, required=False) for name, kind in ANSWER_COLUMNS])
    params = ParamSchema([ParamSpec("batch_size", "long", DEFAULT_BATCH_SIZE)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


# ---------------------------------------------------------------- the model (read side)

class SkinLesionClassifier(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: image bytes / base64 (paths where allowed) in, class probabilities out."""

    def load_context(self, context) -> None:
        config = getattr(context, "model_config", None) or {}
        self.load(context.artifacts["weights"], context.artifacts["preprocessing"],
                  allow_paths=bool(config.get("allow_paths")),
                  calibration=context.artifacts.get("calibration"))

    def load(self, weights: str | os.PathLike, preprocessing: str | os.PathLike,
             device: str | None = None, allow_paths: bool = False,
             calibration: str | os.PathLike | None = None) -> "SkinLesionClassifier":
        """Build the network from preprocessing.json and load the safetensors weights, and
        the calibration file when there is one (without it: plain softmax, null flags).

        allow_paths: accept file paths as input (local use); the environment variable
        SKINLESION_SERVING_ALLOW_PATHS=1 turns them on as well."""
        from safetensors.torch import load_file
        from torchvision.transforms import v2

        from model import HybridConvNeXtV2

        self.allow_paths = allow_paths or os.environ.get(ALLOW_PATHS_ENV, "0").lower() in (
            "1", "true", "yes")
        self.info = json.loads(Path(preprocessing).read_text())
        if self.info.get("format") != PREPROCESSING_FORMAT:
            raise ValueError(f"{preprocessing}: not a {PREPROCESSING_FORMAT} file")
        self.max_rows = limit("MAX_ROWS", MAX_ROWS)
        self.max_bytes = limit("MAX_IMAGE_BYTES", MAX_IMAGE_BYTES)
        self.max_pixels = limit("MAX_PIXELS",
                                PIXELS_PER_PREPARED * int(self.info["prepare_size"]) ** 2)
        self.max_request_pixels = limit("MAX_REQUEST_PIXELS", MAX_REQUEST_PIXELS)
        self.classes = list(self.info["classes"])
        self.model_version = self.info.get("weights_digest") or self.info.get("source", "")
        self.fitted, self.no_fit_reason = (
            decisions.read(calibration, self.info.get("weights_digest")) if calibration
            else (None, decisions.NO_FILE))
        device = device or os.environ.get("SKINLESION_DEVICE") or (
            "cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        net = HybridConvNeXtV2(**{**self.info["model_config"], "pretrained": False})
        net.load_state_dict(load_file(str(weights), device="cpu"))  # strict: every key
        self.net = net.to(self.device).eval()
        self.n_features = sum(net.config["dims"])  # decisions.stage_features' width
        # Same ops as components.training.transforms.eval_transform, with the stored mean/std.
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
            data = bytes(value)
        else:
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            if not isinstance(value, str) or not value:
                raise ImageInputError("expected image bytes or a base64 string"
                                      + (" or a file path" if self.allow_paths else ""))
            data = self._path_bytes(value) if self.allow_paths else None
            if data is None:
                data = self._base64_bytes(value)
        if len(data) > self.max_bytes:
            raise ImageInputError(f"413 image too large: {len(data):,} bytes, the limit is "
                                  f"{self.max_bytes:,}")
        return data

    def _path_bytes(self, value: str) -> bytes | None:
        """The file's bytes when `value` names a readable file (paths allowed), else None."""
        path = Path(value) if len(value) < 4096 else None
        if path is None or not path.is_file():
            return None
        if path.stat().st_size > self.max_bytes:
            raise ImageInputError(f"413 image too large: the limit is {self.max_bytes:,} bytes")
        try:
            return path.read_bytes()
        except OSError:
            raise ImageInputError("400 the file cannot be read") from None

    def _base64_bytes(self, value: str) -> bytes:
        if value.startswith("data:") and "," in value:  # data:image/jpeg;base64,...
            value = value.split(",", 1)[1]
        if len(value) > self.max_bytes * 4 // 3 + 4:  # before decoding anything
            raise ImageInputError(f"413 image too large: the limit is {self.max_bytes:,} bytes")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ImageInputError("400 not a base64-encoded image"
                                  + (", nor a readable file" if self.allow_paths else "")) from None

    def read_header(self, value: Any):
        """One input value -> (opened image, facts) from its header alone, within the limits per
        image; ImageInputError when it is not an image or is too large."""
        from PIL import Image

        from components.common.images import DEFAULT_MAX_PIXELS, CorruptImageError, open_image

        data = self._image_bytes(value)
        try:
            im, info = open_image(data, int(self.info["prepare_size"]))
        except CorruptImageError:  # over Pillow's own bound on the source size
            raise ImageInputError(f"413 image too large: over {DEFAULT_MAX_PIXELS:,} "
                                  f"pixels") from None
        except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise ImageInputError("400 not a decodable image") from None
        if info["decoded_pixels"] > self.max_pixels:
            im.close()
            raise ImageInputError(f"413 image too large: over {self.max_pixels:,} pixels")
        return im, info

    def decode(self, im, info: dict) -> torch.Tensor:
        """An opened image (read_header) -> normalised CHW tensor, prepared as in training."""
        from PIL import Image

        from components.common.images import finish_image

        try:
            image, _ = finish_image(im, info, int(self.info["prepare_size"]),
                                    self.info.get("color_constancy", "none"),
                                    float(self.info.get("minkowski_p", 6.0)))
        except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise ImageInputError("400 not a decodable image") from None
        return self.transform(image)

    def preprocess(self, value: Any) -> torch.Tensor:
        """One input value -> normalised CHW tensor; ImageInputError when it is not an image."""
        return self.decode(*self.read_header(value))

    # -- prediction

    def predict(self, context, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        values = _column(model_input)
        batch_size = (params or {}).get("batch_size", DEFAULT_BATCH_SIZE)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise refused("batch_size must be an integer of at least 1")
        if len(values) > self.max_rows:
            raise refused(f"{len(values)} rows in one request; the limit is {self.max_rows}")
        try:
            return self._predict_rows(values, int(batch_size))
        finally:
            _release_memory()

    def _predict_rows(self, values: list, batch_size: int) -> pd.DataFrame:
        request = CURRENT_REQUEST.get()  # None outside `skinlesion serve`
        logits = np.full((len(values), len(self.classes)), np.nan, dtype=np.float64)
        features = np.zeros((len(values), self.n_features), dtype=np.float64)
        errors = [""] * len(values)
        opened = self._open_within_budget(values, errors)
        rows = list(opened)
        for start in range(0, len(rows), batch_size):
            tensors, done = [], []
            for i in rows[start:start + batch_size]:
                if request is not None and request.gone.is_set():
                    raise RequestGone("the request is gone")
                try:
                    tensors.append(self.decode(*opened.pop(i)))
                    done.append(i)
                except ImageInputError as err:
                    errors[i] = str(err)
            if tensors:
                logits[done], features[done] = self.outputs_tensor(torch.stack(tensors))
        for i in np.flatnonzero(~np.isfinite(logits).all(axis=1)):
            if not errors[i]:  # a broken model answers nothing rather than class 0
                errors[i] = "500 the model's output is not a number"
        return self._answer(logits, features, errors)

    def _answer(self, logits: np.ndarray, features: np.ndarray, errors: list[str]
                ) -> pd.DataFrame:
        """The answer's rows (module docstring) from each row's logits and features; a failed
        row is null."""
        ok = np.array([not e for e in errors], dtype=bool)
        got = decisions.answer(np.where(ok[:, None], logits, 0.0),
                               np.where(ok[:, None], features, 0.0), self.classes, self.fitted,
                               self.no_fit_reason)
        out = pd.DataFrame(got["probs"], columns=self.classes)
        if not ok.all():  # None, not NaN: the scoring server's JSON then holds null
            out = out.astype(object)
            out.loc[~ok, self.classes] = None
        columns = {"predicted": [self.classes[int(np.argmax(p))] for p in got["probs"]],
                   **got["flags"], "ood_score": got["ood_score"],
                   "in_distribution": got["in_distribution"], "reason": got["reason"]}
        for name, values in columns.items():
            blank = "" if name in ("predicted", "reason") else None
            out[name] = pd.Series([v if good else blank for v, good in zip(values, ok)],
                                  dtype=object)
        out["model_version"] = self.model_version
        out["error"] = errors
        return out

    def _open_within_budget(self, values: list, errors: list[str]) -> dict[int, tuple]:
        """{row: opened image} of the rows within the limits per image and, in row order, the
        request's budget of decoded pixels; the other rows get their error. Headers only."""
        opened, spent = {}, 0
        for i, value in enumerate(values):
            try:
                im, info = self.read_header(value)
            except ImageInputError as err:
                errors[i] = str(err)
                continue
            if spent + info["decoded_pixels"] > self.max_request_pixels:
                im.close()
                errors[i] = (f"413 over this request's budget of {self.max_request_pixels:,} "
                             f"decoded pixels: send this image in another request")
                continue
            spent += info["decoded_pixels"]
            opened[i] = (im, info)
        return opened

    def outputs_tensor(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(logits (N, classes), features (N, n_features)) of a preprocessed batch
        (N, 3, H, W), as float64."""
        logits, features = decisions.stage_features(self.net, batch.to(self.device))
        return tuple(t.float().cpu().numpy().astype(np.float64) for t in (logits, features))


def _malloc_trim():
    """glibc's malloc_trim, looked up once; None elsewhere (nothing to trim)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


_LIBC_TRIM = _malloc_trim()


def _release_memory() -> None:
    """Hand freed heap back to the OS. glibc keeps what each thread's arena freed (the scoring
    server predicts on a pool of threads); measured on 4 requests of 4 PNGs of 40 MP: RSS
    +205 MB for good, +85 MB with gc.collect(), +35 MB (the first request only) with this."""
    if _LIBC_TRIM is not None:
        _LIBC_TRIM(0)


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


def load_local(model_dir: str | os.PathLike, device: str | None = None,
               allow_paths: bool = False) -> SkinLesionClassifier:
    """Load a downloaded model directory (or a folder with the two artifacts) without MLflow's
    pyfunc wrapper: for evaluation, benchmarks and tests."""
    model_dir = Path(model_dir)
    for folder in (model_dir, model_dir / "artifacts"):
        if (folder / WEIGHTS_FILE).is_file():
            calibration = folder / CALIBRATION_FILE
            return SkinLesionClassifier().load(folder / WEIGHTS_FILE, folder / PREPROCESSING_FILE,
                                               device, allow_paths,
                                               calibration if calibration.is_file() else None)
    raise FileNotFoundError(f"no {WEIGHTS_FILE} in {model_dir} or {model_dir / 'artifacts'}")


# MLflow "models from code": when MLflow executes this file (as code_model_<uuid>) to log or to
# load the model, hand it the model object. A plain `import components.registry.serving` does not.
if not __name__.startswith("components."):
    mlflow.models.set_model(SkinLesionClassifier())
