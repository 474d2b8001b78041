"""Which OOD score separates a trained model's test split from non-dermoscopy images?

    python benchmarks/ood_scores.py --train_dir RUN --splits SPLITS --img_dir IMAGES

Scores, each thresholded on the validation split so that 95% of it passes, then judged by
AUROC (test split against components/evaluation/ood_images.py's photographs, noise and flat
frames) and the share of each that passes:
- energy -logsumexp(logits) (Liu et al., NeurIPS 2020): what calibration.json uses;
- 1 - max softmax probability (Hendrycks & Gimpel, ICLR 2017), the usual baseline;
- Mahalanobis distance of pooled features to the nearest class mean under one shared
  covariance (Lee et al., NeurIPS 2018), statistics from the training split with
  scikit-learn's Ledoit-Wolf estimator: every stage's features (what calibration.json ships),
  the last stage's, and the head's normalised input.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy.special import logsumexp, softmax
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from components import evaluate
from components.common.decisions import mahalanobis
from components.evaluation.calibration import collect_outputs
from components.evaluation.decisions import ood_statistics
from components.training.dataset import SplitDataset, read_split
from components.training.transforms import eval_transform


def mahalanobis_of(train, view):
    """The Mahalanobis score of one view of the features, statistics from the training split."""
    _, features, y = train
    stats = ood_statistics(view(features), y)
    return lambda features, logits: mahalanobis(view(features), stats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train_dir", required=True)
    p.add_argument("--splits", required=True)
    p.add_argument("--img_dir", required=True)
    args = p.parse_args()
    models, meta = evaluate.load_models(args.train_dir)
    model = models["ema"]
    data = {}
    for split in ("train", "val", "test"):
        frame = read_split(Path(args.splits) / f"{split}.csv")
        data[split] = collect_outputs(model, DataLoader(
            SplitDataset(frame, args.img_dir, eval_transform(meta["img_size"])), batch_size=256))
    photos = evaluate.ood_tensors(meta)
    data["ood"] = collect_outputs(model, [(photos, torch.zeros(len(photos)))])

    last = slice(sum(model.config["dims"][:-1]), None)  # the last stage's pooled output

    def head_input(features):  # what the head's linear layers see
        with torch.no_grad():
            return model.head.norm(torch.from_numpy(features[:, last]).float()).numpy()

    scores = {"energy": lambda f, lg: -logsumexp(lg, axis=1),
              "max_softmax": lambda f, lg: 1 - softmax(lg, axis=1).max(axis=1),
              "mahalanobis_all_stages": mahalanobis_of(data["train"], lambda f: f),
              "mahalanobis_last_stage": mahalanobis_of(data["train"], lambda f: f[:, last]),
              "mahalanobis_head_input": mahalanobis_of(data["train"], head_input)}
    out = {}
    for name, score in scores.items():
        val, test, ood = (score(data[s][1], data[s][0]) for s in ("val", "test", "ood"))
        threshold = float(np.quantile(val, 0.95))
        out[name] = {"auroc": round(float(roc_auc_score(np.r_[np.zeros(len(test)), np.ones(len(ood))],
                                                        np.r_[test, ood])), 4),
                     "test_passed": round(float(np.mean(test <= threshold)), 4),
                     "ood_passed": round(float(np.mean(ood <= threshold)), 4)}
    print(json.dumps({"n_test": len(data["test"][0]), "n_ood": len(data["ood"][0]), **out},
                     indent=2))


if __name__ == "__main__":
    main()
