"""The artifacts between the steps: the file names each step writes into its output folder.

The DVC stages (dvc.yaml), the KFP components (pipeline/kfp_components.py) and the steps
themselves name these files; the steps take folders, the names come from here.

    preprocess  OUT/images/<id>.jpg, OUT/labels.csv (the images it kept), OUT/manifest.csv,
                OUT/preprocess_report.json
    split       OUT/{train,val,test}.csv, OUT/split_report.json
    class_weights  one JSON file (its path is the output)
    train       OUT/checkpoint_{last,best,prev}.pt, OUT/ema_weights.pt, OUT/training_summary.json,
                OUT/calibration.json, OUT/ood_stats.safetensors
    evaluate    OUT/metrics.json, OUT/headline.json, predictions.csv, per_class.csv, roc.csv, reliability.csv,
                figures; OUT/raw/ the same for the raw (non-EMA) weights
    register    one JSON file: the version and alias, or why it was not registered
"""
from __future__ import annotations

# the project's folders (dvc.yaml's stages), relative to its root; the raw dataset is
# versioned by DVC: `dvc add data/raw` writes data/raw.dvc
RAW_DATA = "data/raw"
RAW_DATA_DVC = f"{RAW_DATA}.dvc"
PREPARED_DIR = "data/prepared"
SPLITS_DIR = "data/splits"

# preprocess
PREPARED_IMAGES = "images"
KEPT_LABELS = "labels.csv"
KEPT_METADATA = "metadata.csv"
MANIFEST = "manifest.csv"
PREPROCESS_REPORT = "preprocess_report.json"

# split
SPLITS = ("train", "val", "test")
SPLIT_REPORT = "split_report.json"


def split_csv(name: str) -> str:
    """train.csv, val.csv or test.csv."""
    if name not in SPLITS:
        raise ValueError(f"no split {name!r}; splits are {SPLITS}")
    return f"{name}.csv"


# train
CHECKPOINT_LAST = "checkpoint_last.pt"
CHECKPOINT_BEST = "checkpoint_best.pt"
CHECKPOINT_PREV = "checkpoint_prev.pt"
EMA_WEIGHTS = "ema_weights.pt"
TRAINING_SUMMARY = "training_summary.json"
# temperature, decision thresholds and OOD threshold fitted on validation (evaluation/decisions.py)
CALIBRATION = "calibration.json"
OOD_STATS = "ood_stats.safetensors"  # its out-of-distribution statistics (training split)

# evaluate
METRICS = "metrics.json"
HEADLINE_METRICS = "headline.json"   # the few test metrics DVC shows (dvc exp show)
PREDICTIONS = "predictions.csv"
PER_CLASS = "per_class.csv"
ROC = "roc.csv"
RELIABILITY = "reliability.csv"
RAW_SUBDIR = "raw"
