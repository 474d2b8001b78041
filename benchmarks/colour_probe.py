"""A floor for within-site melanoma-vs-nevus ranking: logistic regression on colour statistics.

    python benchmarks/colour_probe.py --splits outputs/robustness/splits_in_site \\
        --images outputs/robustness/prepared_73_none/images [--sites rosendahl,vidir_modern]

Trained on the train split's MEL and NV images (balanced class weights), scored on the test
split's, pooled and within each site (the split CSVs' `source` column). The features are 30
numbers per image at 64 x 64: the RGB mean, spread and 10/50/90% quantiles of the central
quarter, the surround's mean minus the centre's, and the HSV spread and 10/90% quantiles: the
colour a dermatologist reads ("ABCD": colour variegation), nothing of shape or structure. A
network that ranks melanoma below this inside a site has not learnt the lesion's colour; the
robustness study (benchmarks/robustness.py) reports it beside its candidates.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script

from components.common.labels import CLASS_INDEX, image_index, read_labels  # noqa: E402

SIDE = 64


def colour_features(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB").resize((SIDE, SIDE)), dtype=np.float32) / 255
        hsv = np.asarray(image.convert("HSV").resize((SIDE, SIDE)), dtype=np.float32) / 255
    q = SIDE // 4
    centre, whole, hsv = rgb[q:-q, q:-q].reshape(-1, 3), rgb.reshape(-1, 3), hsv.reshape(-1, 3)
    return np.concatenate([centre.mean(0), centre.std(0),
                           np.quantile(centre, [0.1, 0.5, 0.9], axis=0).ravel(),
                           whole.mean(0) - centre.mean(0), hsv.std(0),
                           np.quantile(hsv, [0.1, 0.9], axis=0).ravel()])


def mel_and_nv(split_csv: Path, images: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, is melanoma, site) of a split's MEL and NV images."""
    frame = read_labels(split_csv)
    frame = frame[frame["label"].isin([CLASS_INDEX["MEL"], CLASS_INDEX["NV"]])]
    features = np.stack([colour_features(images[name]) for name in frame["image"]])
    site = frame["source"].to_numpy(dtype=str) if "source" in frame else np.full(len(frame), "")
    return features, (frame["label"] == CLASS_INDEX["MEL"]).to_numpy(), site


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--splits", type=Path, required=True, help="train.csv and test.csv")
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--sites", default="rosendahl,vidir_modern")
    args = p.parse_args(argv)
    images = image_index(args.images)
    x_train, y_train, _ = mel_and_nv(args.splits / "train.csv", images)
    x_test, y_test, site = mel_and_nv(args.splits / "test.csv", images)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000,
                                                               class_weight="balanced"))
    score = model.fit(x_train, y_train).predict_proba(x_test)[:, 1]
    print(f"pooled: MEL vs NV ROC-AUC {roc_auc_score(y_test, score):.3f} "
          f"({y_test.sum()}/{(~y_test).sum()})")
    for name in args.sites.split(","):
        rows = site == name
        print(f"within {name}: {roc_auc_score(y_test[rows], score[rows]):.3f} "
              f"({y_test[rows].sum()}/{(~y_test[rows]).sum()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
