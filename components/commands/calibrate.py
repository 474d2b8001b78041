"""`skinlesion calibrate`: fit calibration.json for an existing training folder (one trained
before the train step fitted it, or one that must not be retrained).

    skinlesion calibrate --train_dir outputs/train --train_csv data/splits/train.csv \\
        --val_csv data/splits/val.csv --img_dir data/prepared/images [--out FILE] \\
        [--overwrite] [--batch_size 64]

Fits, with the folder's EMA weights, the OOD statistics on the training split and, on the
validation split, the temperature, each decision's threshold and the OOD threshold
(components/evaluation/decisions.py, the same function the train step calls at its end), and
writes them to `--out` (default TRAIN_DIR/calibration.json, where evaluate and the served
model look) with ood_stats.safetensors beside it, atomically. An existing file is kept unless
`--overwrite`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from components.common import cli_args, outputs, tracking
from components.common.labels import CLASSES, LabelError
from components.evaluation.decisions import fit_model
from components.training import checkpoint
from components.training.dataset import SplitDataset, read_split
from components.training.transforms import eval_transform


def run(train_dir, train_csv, val_csv, img_dir, out=None, *, overwrite: bool = False,
        batch_size: int = 64, device: str | None = None) -> dict:
    """Fit and write calibration.json for TRAIN_DIR's EMA weights; returns it."""
    train_dir = Path(train_dir)
    out = Path(out) if out else train_dir / outputs.CALIBRATION
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to fit it again")
    weights = next((train_dir / name for name in (outputs.EMA_WEIGHTS, outputs.CHECKPOINT_LAST)
                    if (train_dir / name).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{train_dir} holds neither {outputs.EMA_WEIGHTS} nor "
                                f"{outputs.CHECKPOINT_LAST}")
    model, meta = checkpoint.load_model(weights, which="ema")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaders = [DataLoader(SplitDataset(read_split(csv), img_dir, eval_transform(meta["img_size"])),
                          batch_size=batch_size, shuffle=False) for csv in (val_csv, train_csv)]
    return fit_model(model.to(device), *loaders, list(CLASSES),
                     checkpoint.weights_digest(model.state_dict()), out, device,
                     source=str(val_csv))


def main(argv: list[str] | None = None) -> int:
    parser = cli_args.ArgumentParser(prog="skinlesion calibrate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--train_dir", required=True, help="a training output folder")
    parser.add_argument("--train_csv", required=True, help="the training split (OOD statistics)")
    parser.add_argument("--val_csv", required=True, help="the validation split it was trained with")
    parser.add_argument("--img_dir", required=True)
    parser.add_argument("--out", help="default: TRAIN_DIR/calibration.json")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    args = parser.parse_args(argv)
    try:
        fitted = run(args.train_dir, args.train_csv, args.val_csv, args.img_dir, args.out,
                     overwrite=args.overwrite, batch_size=args.batch_size, device=args.device)
    except OSError as err:  # a missing input, an existing or unwritable output
        print(f"calibrate: {tracking.scrub(cli_args.os_error(err))}", file=sys.stderr)
        return 1
    except (checkpoint.CheckpointError, LabelError, ValueError) as err:
        print(f"calibrate: {tracking.scrub(str(err))}", file=sys.stderr)
        return 1
    print(json.dumps({k: fitted[k] for k in ("temperature", "decisions", "ood")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
