"""What a registered version's model saw while it learned: the images and lesions of its train
and val splits. register logs them into the version's run (ARTIFACT); promote reads them to
leave those images out when it scores that model on another version's test split (a model
scored on lesions it trained on looks better than it is).

The record is checked against the version: the split folder's train, val and test CSVs must
hash to the split_hash the version was evaluated on (split.py's definition of the hash).
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import pandas as pd

from components.common import outputs

log = logging.getLogger(__name__)

ARTIFACT_DIR = "split"
ARTIFACT = f"{ARTIFACT_DIR}/train_val_images.csv"   # columns image, lesion_id (empty: none)


def folder_split_hash(split_dir: str | os.PathLike) -> str | None:
    """sha256 of the folder's train, val and test CSVs' bytes (split.py's split_hash), or
    None when one is missing."""
    digest = hashlib.sha256()
    for name in outputs.SPLITS:
        path = Path(split_dir) / outputs.split_csv(name)
        if not path.is_file():
            return None
        digest.update(path.read_bytes())
    return digest.hexdigest()


def log_seen(client, run_id: str, split_dir: str | os.PathLike, split_hash: str | None) -> bool:
    """Log the train and val images (and their lesion ids) of `split_dir` into `run_id`, when
    the folder is the split `split_hash` names; False (with a warning) when it is not."""
    found = folder_split_hash(split_dir)
    if not split_hash or found != split_hash:
        log.warning("not recording the training lesions of run %s: %s is split %s, the model "
                    "was evaluated on split %s", run_id, split_dir, (found or "none")[:16],
                    (split_hash or "none")[:16])
        return False
    frames = [pd.read_csv(Path(split_dir) / outputs.split_csv(s), dtype=str,
                          keep_default_na=False) for s in ("train", "val")]
    seen = pd.concat(frames, ignore_index=True)
    if "lesion_id" not in seen:
        seen["lesion_id"] = ""
    with tempfile.TemporaryDirectory(prefix="seen-") as tmp:
        path = Path(tmp) / Path(ARTIFACT).name
        seen[["image", "lesion_id"]].to_csv(path, index=False)
        client.log_artifact(run_id, str(path), artifact_path=ARTIFACT_DIR)
    return True


def read_seen(client, run_id: str | None) -> pd.DataFrame | None:
    """The train and val images (columns image, lesion_id) recorded in `run_id`, or None."""
    if not run_id:
        return None
    with tempfile.TemporaryDirectory(prefix="seen-") as tmp:
        try:
            path = client.download_artifacts(run_id, ARTIFACT, tmp)
        except Exception:  # noqa: BLE001 - not recorded (an older version) or the run is gone
            return None
        return pd.read_csv(path, dtype=str, keep_default_na=False)


def unseen(test: pd.DataFrame, seen: pd.DataFrame) -> pd.Series:
    """Mask of the `test` rows (image[, lesion_id]) neither seen as an image nor from a seen
    lesion."""
    lesions = set(seen["lesion_id"]) - {""}
    keep = ~test["image"].astype(str).isin(set(seen["image"]))
    if "lesion_id" in test:
        ids = test["lesion_id"].astype("string").fillna("")
        keep &= ~ids.isin(lesions)
    return keep
