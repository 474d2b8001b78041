"""Which OOD score separates a trained model's test split from non-dermoscopy images?

    python benchmarks/ood_scores.py --train_dir RUN --splits SPLITS --img_dir IMAGES

Scores, each thresholded on the validation split so that 95% of it passes, then judged by
AUROC (test split against components/evaluation/ood_images.py's photographs, noise and flat
frames) and the share of each that passes:
- energy -logsumexp(logits) (Liu et al., NeurIPS 2020): what calibration.json uses;
- 1 - max softmax probability (Hendrycks & Gimpel, ICLR 2017), the usual baseline;
- Mahalanobis distance of the pooled, normalised features to the nearest class mean under one
  shared covariance (Lee et al., NeurIPS 2018), fitted on the training split with
  scikit-learn's Ledoit-Wolf estimator (shrinkage: a 128-d covariance from 7,000 images).
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy.special import softmax
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from components import evaluate
from components.common.decisions import energy
from components.training.dataset import SplitDataset, read_split
from components.training.transforms import eval_transform


@torch.inference_mode()
def features_and_logits(model, images: torch.Tensor | DataLoader):
    batches = images if isinstance(images, DataLoader) else [(images, None)]
    feats, logits, labels = [], [], []
    for x, y in batches:
        h, pooled = model.stem(x), []
        for stage in model.stages:  # every stage's mean feature (Lee et al. use several layers)
            h = stage(h)
            pooled.append(h.mean(dim=(2, 3)))
        feats.append(torch.cat([model.head.norm(pooled[-1]), *pooled], 1).numpy().astype(np.float64))
        logits.append(model(x).numpy().astype(np.float64))
        if y is not None:
            labels.append(y.numpy())
    return np.concatenate(feats), np.concatenate(logits), (np.concatenate(labels) if labels
                                                           else None)


def mahalanobis(train, cols: slice):
    """The score function of one feature slice, fitted on the training split."""
    feats, _, y = train
    feats = feats[:, cols]
    means = np.stack([feats[y == c].mean(0) for c in np.unique(y)])
    precision = LedoitWolf().fit(feats - means[np.searchsorted(np.unique(y), y)]).precision_

    def score(f, logits):
        d = f[:, cols][:, None, :] - means[None]
        return np.einsum("ncd,de,nce->nc", d, precision, d).min(axis=1)
    return score


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
        loader = DataLoader(SplitDataset(frame, args.img_dir, eval_transform(meta["img_size"])),
                            batch_size=256)
        data[split] = features_and_logits(model, loader)
    data["ood"] = features_and_logits(model, evaluate.ood_tensors(meta))

    width = model.head.norm.normalized_shape[0]
    columns = {"mahalanobis": slice(0, width),                 # the head's normalised input
               "mahalanobis_unnormalised": slice(width + sum(model.config["dims"][:-1]), None),
               "mahalanobis_all_stages": slice(width, None)}
    scores = {"energy": lambda f, lg: energy(lg),
              "max_softmax": lambda f, lg: 1 - softmax(lg, axis=1).max(axis=1),
              **{name: mahalanobis(data["train"], cols) for name, cols in columns.items()}}
    out = {}
    for name, score in scores.items():
        val, test, ood = (score(data[s][0], data[s][1]) for s in ("val", "test", "ood"))
        threshold = float(np.quantile(val, 0.95))
        out[name] = {"auroc": round(float(roc_auc_score(np.r_[np.zeros(len(test)), np.ones(len(ood))],
                                                        np.r_[test, ood])), 4),
                     "test_passed": round(float(np.mean(test <= threshold)), 4),
                     "ood_passed": round(float(np.mean(ood <= threshold)), 4)}
    print(json.dumps({"n_test": len(data["test"][0]), "n_ood": len(data["ood"][0]), **out},
                     indent=2))


if __name__ == "__main__":
    main()
