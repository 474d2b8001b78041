"""Real-data benchmark: the paper's recipe from scratch on HAM10000 (../shared/data), and its
two class-balancing halves on their own.

    python benchmarks/ham10000.py --out outputs/bench_ham10000            # on a GPU
    python benchmarks/ham10000.py --smoke --out /tmp/ham_smoke            # CPU, minutes

Lesion-grouped 70/15/15 split with seed 0 (components.split), then three trainings, each
evaluated with its final EMA model on the test split:

    paper          weighted sampler + class-weighted loss (the paper has both)
    sampler_only   weighted sampler, plain loss
    loss_only      class-weighted loss, uniform sampling

Prints test accuracy, balanced accuracy and macro F1 per variant and writes results.json.
`--smoke` trains a tiny model at 32 px on a few images per class for one epoch: it checks
that the script runs, not the numbers. Images: CC BY-NC-SA 4.0, test use only.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components import split, train  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000-200x150"
VARIANTS = {
    "paper": dict(weighted_sampler=True, class_weighted_loss=True),
    "sampler_only": dict(weighted_sampler=True, class_weighted_loss=False),
    "loss_only": dict(weighted_sampler=False, class_weighted_loss=True),
}
SMOKE = dict(dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), img_size=32, epochs=1, batch_size=8,
             warmup_epochs=0, num_workers=0, gpu_resident="off")
SMOKE_PER_CLASS = {"train": 4, "val": 2, "test": 2}


def make_splits(data: Path, out: Path, smoke: bool) -> dict[str, Path]:
    """Lesion-grouped split of the labelled images (seed 0); smoke: a few per class."""
    split.run(data / "labels.csv", out, metadata=data / "image_info.csv", mode="grouped",
              seed=0)
    paths = {name: out / f"{name}.csv" for name in ("train", "val", "test")}
    if smoke:
        for name, path in paths.items():
            frame = pd.read_csv(path)
            frame.groupby("label").head(SMOKE_PER_CLASS[name]).to_csv(path, index=False)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "params.yaml"),
                   help="its train section is the recipe (default: params.yaml, the paper's)")
    p.add_argument("--epochs", type=int, help="override the recipe's 100")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--smoke", action="store_true", help="tiny CPU run that checks the script")
    p.add_argument("--no-mlflow", dest="mlflow", action="store_false")
    args = p.parse_args(argv)

    splits = make_splits(args.data, args.out / "splits", args.smoke)
    results = {}
    for name in args.variants.split(","):
        overrides = {**(SMOKE if args.smoke else {}), **VARIANTS[name]}
        if args.epochs:
            overrides["epochs"] = args.epochs
        cfg = train.TrainConfig.resolve(args.config, **overrides)
        summary = train.run(splits["train"], args.data / "images", args.out / name,
                            val_csv=splits["val"], test_csv=splits["test"], config=cfg,
                            mlflow=args.mlflow and not args.smoke,
                            experiment="ham10000-benchmark")
        test = summary["test"]
        results[name] = {"accuracy": test["test_ema_accuracy"],
                         "balanced_accuracy": test["test_ema_balanced_accuracy"],
                         "macro_f1": test["test_ema_macro_f1"],
                         "epochs": cfg.epochs, "seconds": summary["seconds"],
                         "mlflow_run_id": summary["mlflow_run_id"]}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'variant':13} {'acc':>6} {'bal acc':>8} {'macro F1':>9}")
    for name, r in results.items():
        print(f"{name:13} {r['accuracy']:6.3f} {r['balanced_accuracy']:8.3f} {r['macro_f1']:9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
