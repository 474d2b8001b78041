"""Training checkpoints: written atomically, read back only with `torch.load(weights_only=True)`.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (nothing a
weights-only load would refuse):

    format        "skinlesion-checkpoint/1"
    model_config  HybridConvNeXtV2 constructor kwargs (`model.config`)
    classes       class names, in output order
    img_size, mean, std    the input the model expects
    prepare_size, color_constancy, minkowski_p   how the preprocess step prepared the training
                  images (None: not known)
    split_hash    the split_report.json hash of the split trained on (or None)
    model, ema    state dicts of the raw and the EMA weights
    optimizer, scheduler, scaler    their state dicts (training checkpoints only)
    rng           torch / cuda / numpy / python generator states
    sampler       {"seed": int}: samplers are reseeded from (seed, epoch)
    epoch, step   completed epochs and optimizer steps
    best          {"epoch", "metric", "value"} of the best validation so far (or None)
    history       per-epoch metric dicts
    mlflow_run_id the run a resume continues (or None)
    train_config  the training settings, for the record

`ema_weights.pt` (the shipped model) has the same layout without the training state.

`save(..., keep_previous=PREV)` keeps the file it replaces as checkpoint_prev.pt (a hard link,
renamed into place: no copy, and no moment without a readable checkpoint_last.pt); the
training links checkpoint_best.pt to the checkpoint_last.pt of its best epoch the same way;
`load_for_resume(path, fallback=True)` falls back to it when `path` is unreadable, and only then.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import random
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model import HybridConvNeXtV2

from components.common import atomic, outputs

FORMAT = "skinlesion-checkpoint/1"
# What load_model returns beside the network: the input contract and where it came from.
# What the inputs were made with (training/out_dir.lineage), stored with the weights so that
# the served model prepares an image as the training images were prepared.
LINEAGE_KEYS = ("prepare_size", "color_constancy", "minkowski_p", "split_hash")
META_KEYS = ("model_config", "classes", "img_size", "mean", "std", *LINEAGE_KEYS, "epoch", "step")
WEIGHT_KEYS = ("model", "ema")
PREV = outputs.CHECKPOINT_PREV


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not hold what is asked of it."""


def save(path: str | os.PathLike, state: dict, keep_previous: str | None = None) -> None:
    """Write `state` to `path` in one rename: a crash leaves the previous file intact.

    keep_previous: a file name; the file `path` held until now is kept under it, beside `path`.
    """
    path = Path(path)
    with atomic.atomic_path(path) as tmp:
        try:
            torch.save({"format": FORMAT, **state}, tmp)
        except (RuntimeError, OSError) as err:
            # torch reports a full disk as "enforce fail at inline_container.cc": say it plainly.
            free = shutil.disk_usage(path.parent).free
            if isinstance(err, OSError) and err.errno != errno.ENOSPC and free > 1 << 20:
                raise
            if free < 1 << 26 or getattr(err, "errno", None) == errno.ENOSPC:
                raise CheckpointError(
                    f"no space left on the device writing {path} ({free / 2**20:.1f} MiB free); "
                    f"the previous checkpoint is intact: free space and --resume it") from err
            raise
        if keep_previous and path.exists():
            link(path, path.with_name(keep_previous))


def link(path: str | os.PathLike, name: str | os.PathLike) -> None:
    """Make `name` (replacing any file of that name) a hard link to `path`: no copy, no space
    needed (a full disk cannot fail it halfway), and renamed into place (never half-done).
    `path` on another file system (a resume from elsewhere): a copy, renamed into place."""
    name = Path(name)
    staged = name.with_name(f".{name.name}.link")
    staged.unlink(missing_ok=True)
    try:
        os.link(path, staged)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        shutil.copyfile(path, staged)  # a partial copy is a stale .link, removed on resume
    os.replace(staged, name)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by `save`; a truncated or foreign file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for a damaged zip / pickle
        if "Weights only load failed" in str(err):
            raise CheckpointError(
                f"checkpoint {path} holds objects a weights-only load refuses (a pickle that "
                f"would run code?); not loaded: {str(err).splitlines()[0]}") from err
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated or corrupt?): {err}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file")
    return state


def load_for_resume(path: str | os.PathLike, fallback: bool = False) -> tuple[dict, Path]:
    """load(path) for a resume; returns (state, the file used).

    fallback: when `path` is unreadable, resume from checkpoint_prev.pt beside it instead,
    printing a warning naming both, and move the unreadable file aside to `<name>.corrupt`
    (kept for inspection; the next save would otherwise keep it as checkpoint_prev.pt).
    Without fallback an unreadable checkpoint is an error.
    """
    path = Path(path)
    try:
        return load(path), path
    except CheckpointError as err:
        previous = path.with_name(PREV)
        if not fallback or previous == path or not previous.is_file():
            raise
        state = load(previous)  # a CheckpointError naming it if this one is bad too
        note = ""
        if path.exists():
            os.replace(path, path.with_name(path.name + ".corrupt"))
            note = f" (moved aside to {path.name}.corrupt)"
        print(f"warning: {err}{note}; resuming from the previous checkpoint {previous} (epoch "
              f"{state.get('epoch')}) as --resume_fallback allows", file=sys.stderr, flush=True)
        return state, previous


def load_model(path: str | os.PathLike, which: str = "ema",
               map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the HybridConvNeXtV2 stored in a checkpoint, in eval mode.

    Args:
        path: a training checkpoint or `ema_weights.pt`.
        which: "ema" (the averaged weights, the shipped model) or "model" (the raw weights).

    Returns:
        (model, meta) where meta holds model_config, classes, img_size, mean, std, epoch and
        step (the last two None for a file without them).
    """
    if which not in WEIGHT_KEYS:
        raise ValueError(f"which must be one of {WEIGHT_KEYS}, got {which!r}")
    state = load(path, map_location)
    if which not in state:
        raise CheckpointError(f"{path} holds no {which!r} weights (it has {sorted(state)})")
    # pretrained=False: the stored weights replace any initialisation anyway.
    model = HybridConvNeXtV2(**{**state["model_config"], "pretrained": False})
    model.load_state_dict(state[which])
    meta = {key: state.get(key) for key in META_KEYS}
    return model.eval(), meta


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensors (names, dtypes, shapes, values), whatever file holds them: the
    EMA weights in checkpoint_last.pt, ema_weights.pt and the served safetensors agree."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def check_finite(state_dict: dict[str, torch.Tensor], source: str) -> None:
    """A CheckpointError naming the first tensor holding NaN or inf (a diverged training)."""
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{source}: weights {name} hold NaN or inf values (training "
                                  f"diverged?); refusing to use them")


def rng_state() -> dict:
    """Every global generator training draws from (weights-only loadable types)."""
    bit_gen, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"bit_generator": bit_gen, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    random.setstate(_as_tuples(state["python"]))


def _as_tuples(value):
    # random.setstate wants the exact nested tuples getstate gave.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
