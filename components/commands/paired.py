"""promote's comparison: champion and challenger scored on the same test images.

The images are the challenger's test split (its split folder's test.csv, checked against the
split_hash the challenger was evaluated on, and the prepared image folder). When the champion
was tested on another split, every image whose lesion (or the image itself) was in the
champion's train or val data is left out (registry/seen_lesions.py: register recorded them),
and the champion's registered model is scored on the rest. Each side's probabilities come
from its evaluation's logged predictions.csv when that covers exactly these images with these
labels and was made by these weights, else from scoring its registered model here.

The decision is metrics.paired_gate on metrics.paired_difference: challenger minus champion
on those images, a lesion-level paired bootstrap interval, promoted when its lower bound is
above min_delta (for ece: its upper bound below -min_delta).
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from components.common import outputs, tracking
from components.common.labels import CLASSES, read_labels
from components.evaluation.metrics import paired_difference
from components.evaluation.mlflow_log import DIGEST_TAG
from components.registry import seen_lesions

log = logging.getLogger(__name__)

PREDICTIONS_ARTIFACT = f"evaluation/{outputs.PREDICTIONS}"   # evaluation/mlflow_log.py


class Refused(ValueError):
    """The two versions cannot be compared on the same images (the reason says why)."""


@dataclass
class TestImages:
    """Where the challenger's test images are: its split folder and the prepared images."""
    split_dir: Path
    img_dir: Path

    @classmethod
    def of_project(cls, split_dir=None, img_dir=None) -> "TestImages":
        root = tracking.project_root()
        return cls(Path(split_dir or root / outputs.SPLITS_DIR),
                   Path(img_dir or root / outputs.PREPARED_DIR / outputs.PREPARED_IMAGES))


def compare(client, name: str, challenger, champion, metric: str, images: TestImages,
            split_hash: str, same_split: bool, n_boot: int = 1000) -> dict:
    """paired_difference of challenger minus champion on the challenger's test images (less
    the champion's train/val images and lesions when the splits differ), with n_test (the
    challenger's test images), n_left_out, and where each side's scores came from."""
    test = _test_frame(images, split_hash, challenger)
    n_test = len(test)
    if not same_split:
        seen = seen_lesions.read_seen(client, champion.run_id)
        if seen is None:
            raise Refused(f"champion v{champion.version} has no record of its training lesions "
                          f"({seen_lesions.ARTIFACT} in run {champion.run_id}; register records "
                          f"it): cannot tell which test images it trained on")
        test = test[seen_lesions.unseen(test, seen).to_numpy()].reset_index(drop=True)
        if test.empty:
            raise Refused(f"all {n_test} test images of challenger v{challenger.version} are "
                          f"in champion v{champion.version}'s train/val lesions: no image "
                          f"left to compare on")
    tta = _run_tag(client, challenger.run_id, "evaluate.tta") == "true"
    probs, sources = {}, {}
    for role, version in (("challenger", challenger), ("champion", champion)):
        logged = _logged(client, version, test) if same_split or role == "challenger" else None
        probs[role] = logged if logged is not None else _score(name, version, test,
                                                               images.img_dir, tta)
        sources[role] = "logged" if logged is not None else "scored"
    groups = test["lesion_id"].to_numpy(dtype=object) if "lesion_id" in test else None
    diff = paired_difference(test["label"].to_numpy(), probs["challenger"], probs["champion"],
                             groups, metric, n=n_boot)
    return {**diff, "n_test": n_test, "n_left_out": n_test - len(test),
            "scores_challenger": sources["challenger"], "scores_champion": sources["champion"]}


def _test_frame(images: TestImages, split_hash: str, challenger) -> pd.DataFrame:
    found = seen_lesions.folder_split_hash(images.split_dir)
    if found is None:
        raise Refused(f"no split CSVs in {images.split_dir} (--split_dir: the challenger's "
                      f"split folder)")
    if found != split_hash:
        raise Refused(f"{images.split_dir} holds split {found[:16]}, challenger "
                      f"v{challenger.version} was tested on {split_hash[:16]} (--split_dir: "
                      f"its split folder)")
    return read_labels(images.split_dir / outputs.split_csv("test"))


def _run_tag(client, run_id: str | None, key: str) -> str | None:
    try:
        return client.get_run(run_id).data.tags.get(key) if run_id else None
    except Exception:  # noqa: BLE001 - a deleted run: no tag
        return None


def _logged(client, version, test: pd.DataFrame) -> np.ndarray | None:
    """The version's logged test probabilities for exactly `test`'s images, in its order, when
    its run's evaluation scored these weights and gave these labels; else None."""
    digest = version.tags.get("weights_hash")
    if not digest or _run_tag(client, version.run_id, DIGEST_TAG) != digest:
        return None
    with tempfile.TemporaryDirectory(prefix="predictions-") as tmp:
        try:
            path = client.download_artifacts(version.run_id, PREDICTIONS_ARTIFACT, tmp)
        except Exception:  # noqa: BLE001 - never logged: score the model instead
            return None
        table = pd.read_csv(path, dtype={"image": str}).drop_duplicates("image")
    table = table.set_index("image").reindex(test["image"].astype(str))
    names = np.asarray(CLASSES)[test["label"].to_numpy()]
    if table["true"].isna().any() or (table["true"].to_numpy() != names).any():
        return None
    return table[[f"prob_{c}" for c in CLASSES]].to_numpy(dtype=np.float64)


def _score(name: str, version, test: pd.DataFrame, img_dir: Path, tta: bool) -> np.ndarray:
    """Probabilities of the registered model (the served network, weights_only) on `test`."""
    import torch  # torch only when a model is scored: promote on tags alone stays light
    from torch.utils.data import DataLoader

    from components import evaluate
    from components.registry import pyfunc
    from components.training import checkpoint
    from components.training.dataset import SplitDataset
    from components.training.transforms import eval_transform

    net, info = pyfunc.load_network(f"models:/{name}/{version.version}")
    checkpoint.check_finite(net.state_dict(), f"{name} v{version.version}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = DataLoader(SplitDataset(test, img_dir, eval_transform(int(info["img_size"]))),
                        batch_size=64, shuffle=False)
    log.info("scoring %s v%s on %d test images", name, version.version, len(test))
    return evaluate.predict({"ema": net}, loader, device, tta)["ema"]
