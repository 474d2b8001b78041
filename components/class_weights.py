"""class_weights step: inverse-frequency class weights from the train split.

Weights are scikit-learn's `compute_class_weight("balanced")`: n_images / (n_classes * count),
so a class with the average count weighs 1. The JSON lists classes, counts and weights in
CLASSES order; training indexes the weights with the integer labels.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from components import atomic
from components.labels import CLASSES, LabelError, read_labels


def run(train: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write {classes, counts, weights} for the train CSV to `out`; return the same dict."""
    labels = read_labels(train)["label"].to_numpy()
    counts = np.bincount(labels, minlength=len(CLASSES))
    absent = [name for name, n in zip(CLASSES, counts) if n == 0]
    if absent:
        # A zero count has no finite inverse frequency; training could never learn the class.
        raise LabelError(train, None, f"no training image of class {', '.join(absent)}")
    weights = compute_class_weight("balanced", classes=np.arange(len(CLASSES)), y=labels)
    result = {
        "classes": list(CLASSES),
        "counts": counts.tolist(),
        "weights": [round(float(w), 6) for w in weights],
        "method": "balanced: n_images / (n_classes * count)",
        "train": str(Path(train)),
    }
    atomic.write_json(out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.class_weights", description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="train split CSV")
    parser.add_argument("--out", required=True, help="output JSON path")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.train, args.out), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
