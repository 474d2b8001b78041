"""split step: train/val/test CSVs and a report on class balance and lesion leakage.

Modes:

- `grouped` (default): grouped by `lesion_id` (an image without a lesion id is its own
  group), so no lesion is in two splits, and stable as the data grows: a group's split is a
  hash of (split.seed, its lesion id) cut at the fractions (hashed_split), so adding or
  removing images never moves another group, and DVC, KFP and the CLI give the same split
  with no earlier split to read. docs/DESIGN.md, "A split stable as the data grows", says why
  and what it costs in class balance.
- `folds`: the earlier default, stratified by class and grouped, from scikit-learn's
  StratifiedGroupKFold (the data cut into equal folds, 20 for 15% steps, whole folds to test,
  val and train). Recomputed from scratch, so new data moves lesions between splits; kept to
  reproduce the figures measured on it.
- `paper`: image-level stratified 70/15/15 as Ozdemir & Pacal did. Images of one lesion can
  land in train and test; the report's `test_lesion_leakage` says how often (about 58% of
  test images on ISIC 2019).
- `source`: cross-site: the sources in `split.test_sources` (`--test_sources BCN,MSK4`)
  are the whole test split; val is a hashed, lesion-grouped `val_frac` of the other sources, the rest
  trains. An image's source is its metadata's `source` column, else its lesion id's prefix
  (ISIC 2019: BCN, HAM, MSK4), else "unknown" (labels.sources). A lesion with images from
  two sources is left out of every split and listed in the report.

Outputs: OUT/train.csv, OUT/val.csv, OUT/test.csv (image,label[,lesion_id][,source], integer
labels in CLASSES order, sorted by image) and OUT/split_report.json (counts per class, and per
source, of every split). `split_hash` is the sha256 of the three CSVs' bytes, train then val
then test: equal hashes mean identical splits.

`--previous DIR` (an earlier split's output folder; the DVC stage passes its own, kept between
runs): the report's `previous` counts images and groups new, kept and removed, and kept ones
that moved. A kept image whose label changed stops the split (one line naming it) unless
`split.accept_relabel` (`--accept_relabel`) accepts it: a relabelling is a data change someone
must confirm.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from components.common import atomic, cli_args, outputs
from components.common.config import ConfigError, SplitConfig
from components.common.labels import CLASSES, LabelError, read_labels, sources

log = logging.getLogger(__name__)

SPLITS = outputs.SPLITS
# A class share this far (in points) from the overall one is worth a warning (DESIGN.md).
MAX_SHARE_DEVIATION_PP = 2.0
LEFT_OUT = -1  # source_split: an image in no split


def _fold_plan(val_frac: float, test_frac: float) -> tuple[int, int, int]:
    """(folds, val folds, test folds): the fewest equal folds that express both fractions.

    0.15/0.15 needs 20 folds (5% each); fractions are rounded to whole percents.
    """
    fracs = [Fraction(round(f * 100), 100) for f in (val_frac, test_frac)]
    folds = int(np.lcm.reduce([f.denominator for f in fracs]))
    val, test = (int(f * folds) for f in fracs)
    return folds, val, test


def hashed_split(groups: np.ndarray, val_frac: float, test_frac: float, seed: int) -> np.ndarray:
    """Split index per image (0 train, 1 val, 2 test) from its group alone: sha256 of the seed
    and the group key as a number in [0, 1), test below test_frac, val below test_frac +
    val_frac. (sha256, not Python's hash(), which changes between processes.)"""
    keys, index = np.unique(groups, return_inverse=True)
    unit = np.array([int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "big")
                     for key in keys]) / 2.0 ** 64
    per_group = np.where(unit < test_frac, 2, np.where(unit < test_frac + val_frac, 1, 0))
    split = per_group[index]
    wanted = (True, val_frac > 0, test_frac > 0)
    if empty := [name for s, name in enumerate(SPLITS) if wanted[s] and not (split == s).any()]:
        raise ValueError(f"{len(keys)} lesion{'s' * (len(keys) != 1)} (an image without a "
                         f"lesion id counts as one) left the {' and '.join(empty)} split "
                         f"empty; give more images")
    return split


def folds_split(labels: np.ndarray, groups: np.ndarray, val_frac: float, test_frac: float,
                seed: int) -> np.ndarray:
    """Split index per image, whole groups only, stratified by label (StratifiedGroupKFold)."""
    folds, val, test = _fold_plan(val_frac, test_frac)
    # scikit-learn's own messages for these name its parameters, not the data: say it here.
    if (n_groups := len(set(groups))) < folds:
        raise ValueError(f"{n_groups} lesion{'s' * (n_groups != 1)} (an image without a lesion "
                         f"id counts as one) cannot fill the {folds} folds a grouped split of "
                         f"{val_frac:g}/{test_frac:g} cuts; give more images, or split.mode paper")
    if np.bincount(labels).max() < folds:
        raise ValueError(f"no class has {folds} images, one for each of the {folds} folds a "
                         f"grouped split of {val_frac:g}/{test_frac:g} cuts; give more images")
    fold_of = np.empty(len(labels), dtype=int)
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, members) in enumerate(cv.split(np.zeros(len(labels)), labels, groups)):
        fold_of[members] = k
    return np.where(fold_of < test, 2, np.where(fold_of < test + val, 1, 0))


def paper_split(labels: np.ndarray, val_frac: float, test_frac: float, seed: int) -> np.ndarray:
    """Split index per image, image-level stratified: test first, then val from the rest."""
    index = np.arange(len(labels))
    # Whole image counts, so that 0.15 of 400 is 60 and not 61 through float rounding.
    n_val, n_test = round(val_frac * len(labels)), round(test_frac * len(labels))
    counts = np.bincount(labels, minlength=len(CLASSES))
    if single := [c for c, n in zip(CLASSES, counts) if n == 1]:
        raise ValueError(f"class {', '.join(single)} has a single image; a stratified (paper) "
                         f"split needs at least 2 of each class present")
    if min(n_val, n_test) < (present := int((counts > 0).sum())):
        raise ValueError(f"{len(labels)} images are too few for a stratified (paper) split: "
                         f"val and test would hold {n_val} and {n_test} images for "
                         f"{present} classes")
    rest, test = train_test_split(index, test_size=n_test, stratify=labels, random_state=seed)
    left = np.bincount(labels[rest], minlength=len(CLASSES))
    if thin := [c for c, n in zip(CLASSES, left) if n == 1]:
        raise ValueError(f"class {', '.join(thin)} has too few images for a stratified (paper) "
                         f"split: the test set takes one and val needs 2 of each class left; "
                         f"give more images of it")
    _, val = train_test_split(rest, test_size=n_val, stratify=labels[rest], random_state=seed)
    split = np.zeros(len(labels), dtype=int)
    split[val], split[test] = 1, 2
    return split


def source_split(groups: np.ndarray, source: np.ndarray,
                 test_sources: tuple[str, ...], val_frac: float, seed: int) -> np.ndarray:
    """Split index per image: the test sources entire; val a grouped share of the others."""
    if unknown := sorted(set(test_sources) - set(source)):
        raise ValueError(f"test sources {unknown} are not in the data; its sources are "
                         f"{sorted(set(source))}")
    # A lesion imaged at two sites (9 on HAM10000, Vienna's two collections) belongs to no
    # site: in a held-out site's test split or in training, it would carry one site's images
    # across the line. It is left out of every split (LEFT_OUT), and the report lists it.
    per_group = pd.DataFrame({"g": groups, "s": source}).groupby("g")["s"].nunique()
    mixed = np.isin(groups, per_group.index[per_group > 1])
    split = np.full(len(groups), 2)
    rest = ~np.isin(source, test_sources) & ~mixed
    if not rest.any():
        raise ValueError(f"every image is in a test source {list(test_sources)}: nothing to train on")
    split[rest] = hashed_split(groups[rest], val_frac, 0.0, seed)
    split[mixed] = LEFT_OUT
    return split


def _report(table: pd.DataFrame, split: np.ndarray) -> dict:
    """Counts per class and split, class-share deviations, shared lesions and test leakage."""
    overall = np.bincount(table["label"], minlength=len(CLASSES)) / len(table)
    counts, max_dev, missing = {}, 0.0, {}
    for s, name in enumerate(SPLITS):
        per_class = np.bincount(table["label"][split == s], minlength=len(CLASSES))
        counts[name] = dict(zip(CLASSES, per_class.tolist()))
        if per_class.sum():
            max_dev = max(max_dev, float(np.abs(per_class / per_class.sum() - overall).max()))
        missing[name] = [c for c, n in zip(CLASSES, per_class) if n == 0]
    report = {"sizes": {name: int((split == s).sum()) for s, name in enumerate(SPLITS)},
              "counts": counts,
              "max_class_share_deviation_pp": round(100 * max_dev, 3),
              "classes_missing": missing}
    if "source" in table.columns:
        report["sources"] = {name: table["source"][split == s].value_counts().sort_index()
                             .to_dict() for s, name in enumerate(SPLITS)}
    if "lesion_id" in table.columns:
        lesions = {name: set(table["lesion_id"][split == s].dropna()) for s, name in enumerate(SPLITS)}
        report["lesions_shared"] = {
            "train_val": len(lesions["train"] & lesions["val"]),
            "train_test": len(lesions["train"] & lesions["test"]),
            "val_test": len(lesions["val"] & lesions["test"]),
        }
        test_lesions = table["lesion_id"][split == 2]
        leaked = test_lesions.isin(list(lesions["train"])) & test_lesions.notna()
        report["test_lesion_leakage"] = round(float(leaked.mean()), 4) if len(test_lesions) else 0.0
        report["lesions_with_several_classes"] = _several_classes(table)
    return report


def _several_classes(table: pd.DataFrame) -> dict[str, list[str]]:
    """{lesion id: its classes} of lesions whose images carry different labels, with a warning.

    Reported, not refused: the split keeps such a lesion whole and stays valid, and archives
    label each image (a lesion followed over time may be re-diagnosed); but a labelling error
    looks the same, so whoever reads the report or the log sees the ids.
    """
    classes = table.dropna(subset=["lesion_id"]).groupby("lesion_id")["label"].unique()
    several = {str(lesion): [CLASSES[c] for c in sorted(labels)]
               for lesion, labels in classes.items() if len(labels) > 1}
    if several:
        ids = sorted(several)
        log.warning("%d lesion%s images of several classes (%s%s); listed in the split report",
                    len(ids), " has" if len(ids) == 1 else "s have", ", ".join(ids[:5]),
                    ", ..." if len(ids) > 5 else "")
    return several


def group_keys(table: pd.DataFrame) -> pd.Series:
    """Each image's group: its lesion id, else the image itself."""
    return (table["lesion_id"].fillna(table["image"]) if "lesion_id" in table.columns
            else table["image"]).astype(str)


def assign(table: pd.DataFrame, cfg: SplitConfig) -> np.ndarray:
    """Split index per row of a read_labels table (with sources), as cfg's mode splits it."""
    mode, seed, val_frac, test_frac = cfg.mode, cfg.seed, cfg.val_frac, cfg.test_frac
    y, groups = table["label"].to_numpy(), group_keys(table).to_numpy()
    if mode in ("grouped", "folds") and "lesion_id" not in table.columns:
        log.warning("no lesion_id (give --metadata): each image is its own group")
    if mode == "source" and "source" not in table.columns:
        raise ValueError("split.mode source needs a source or lesion_id per image (give "
                         "--metadata)")
    if mode == "grouped":
        return hashed_split(groups, val_frac, test_frac, seed)
    if mode == "folds":
        return folds_split(y, groups, val_frac, test_frac, seed)
    if mode == "source":
        return source_split(groups, table["source"].to_numpy(dtype=str),
                            tuple(cfg.test_sources), val_frac, seed)
    return paper_split(y, val_frac, test_frac, seed)


def read_table(labels: str | os.PathLike, metadata: str | os.PathLike | None = None) -> pd.DataFrame:
    """read_labels, with each image's source where lesion ids or sources are known."""
    table = read_labels(labels, metadata=metadata)
    if "lesion_id" in table.columns or "source" in table.columns:
        table["source"] = sources(table)
    return table


def versioned(table: pd.DataFrame, split: np.ndarray) -> pd.DataFrame:
    """image -> label, group, split name: what compare() needs of one version."""
    return pd.DataFrame({"label": table["label"].to_numpy(), "group": group_keys(table).to_numpy(),
                         "split": np.asarray(SPLITS)[split]}, index=table["image"].to_numpy())


def read_split(folder: Path) -> pd.DataFrame:
    """An earlier split's output folder as versioned() frames it."""
    parts = [read_labels(folder / outputs.split_csv(name)).assign(split=name) for name in SPLITS]
    table = pd.concat(parts, ignore_index=True)
    return versioned(table, table["split"].map(SPLITS.index).to_numpy())


def compare(before: pd.DataFrame, after: pd.DataFrame) -> dict:
    """Images and groups new, kept and removed from `before` to `after` (versioned frames),
    kept images (and their groups) in another split, and kept images relabelled (ids)."""
    kept = before.index.intersection(after.index)
    groups = set(before["group"]), set(after["group"])
    moved = kept[before.loc[kept, "split"] != after.loc[kept, "split"]]
    relabelled = kept[before.loc[kept, "label"] != after.loc[kept, "label"]]
    return {"images": {"new": len(after.index.difference(before.index)), "kept": len(kept),
                       "removed": len(before.index.difference(after.index))},
            "groups": {"new": len(groups[1] - groups[0]), "kept": len(groups[0] & groups[1]),
                       "removed": len(groups[0] - groups[1])},
            "moved": {"images": len(moved), "groups": after.loc[moved, "group"].nunique()},
            "relabelled": sorted(relabelled)}


def _against_previous(labels, previous: Path, current: pd.DataFrame, accept_relabel: bool) -> dict | None:
    """compare() with the split in `previous` (None when it holds none yet: a first split)."""
    # A fresh clone holds the folder (DVC's .gitignore, the uncached report) but no CSV yet.
    if not any((previous / outputs.split_csv(name)).is_file() for name in SPLITS):
        log.info("no earlier split in %s: every image is new", previous)
        return None
    before = read_split(previous)
    change = {"folder": str(previous), **compare(before, current)}
    if (relabelled := change["relabelled"]) and not accept_relabel:
        image = relabelled[0]
        old, new = (CLASSES[frame.loc[image, "label"]] for frame in (before, current))
        more = f" (and {len(relabelled) - 1} more)" if len(relabelled) > 1 else ""
        raise LabelError(labels, None, f"image {image} was {old} in the earlier split "
                                       f"{previous} and is {new} now{more}: a relabelled image is "
                                       f"a data change to confirm; accept it with --accept_relabel "
                                       f"(split.accept_relabel)")
    if change["moved"]["images"]:
        log.warning("%d images of %d kept groups moved to another split since %s (split "
                    "settings changed?)", change["moved"]["images"], change["moved"]["groups"],
                    previous)
    return change


def run(labels: str | os.PathLike, out: str | os.PathLike, *, config: SplitConfig | None = None,
        metadata: str | os.PathLike | None = None, previous: str | os.PathLike | None = None,
        **settings) -> dict:
    """Write train/val/test CSVs and split_report.json into `out`; return the report.

    config (or settings such as mode=, seed=): params.yaml's `split` section. previous: an
    earlier split's folder to compare with (module docstring).
    """
    cfg = config or SplitConfig.from_dict(settings)
    mode, seed, val_frac, test_frac = cfg.mode, cfg.seed, cfg.val_frac, cfg.test_frac
    table = read_table(labels, metadata)
    try:
        split = assign(table, cfg)
    except ValueError as err:  # what the data cannot give: name the file that holds it
        raise LabelError(labels, None, str(err)) from None
    if (left_out := split == LEFT_OUT).any():
        left_out_lesions = sorted(table.loc[left_out, "lesion_id"].unique())
        log.warning("%d lesions (%d images) have images from several sources and are left out "
                    "of every split, e.g. %s", len(left_out_lesions), left_out.sum(),
                    left_out_lesions[0])
        table, split = table[~left_out].reset_index(drop=True), split[~left_out]
    else:
        left_out_lesions = []
    change = (None if previous is None else
              _against_previous(labels, Path(previous), versioned(table, split), cfg.accept_relabel))

    columns = ["image", "label"] + [c for c in ("lesion_id", "source") if c in table.columns]
    out = Path(out)
    digest = hashlib.sha256()
    for s, name in enumerate(SPLITS):
        buffer = io.StringIO()
        table.loc[split == s, columns].sort_values("image").to_csv(buffer, index=False, lineterminator="\n")
        data = buffer.getvalue().encode("utf-8")
        digest.update(data)
        atomic.write_bytes(out / outputs.split_csv(name), data)

    report = {"mode": mode, "seed": seed, "val_frac": val_frac, "test_frac": test_frac,
              **({"test_sources": list(cfg.test_sources),
                  "left_out_mixed_source_lesions": left_out_lesions} if mode == "source" else {}),
              "labels": str(labels), "metadata": str(metadata) if metadata else None,
              **_report(table, split), "split_hash": digest.hexdigest(),
              **({"previous": change} if previous is not None else {})}
    for name, classes in report["classes_missing"].items():
        if classes:
            log.warning("%s split has no image of %s", name, ", ".join(classes))
    if mode == "grouped" and (deviation := report["max_class_share_deviation_pp"]) > MAX_SHARE_DEVIATION_PP:
        log.warning("a class's share in one split is %.1f points from its overall share (the "
                    "hashed split's chance on few lesions): for a dataset's first version, "
                    "another split.seed can balance it; later it would move every lesion",
                    deviation)
    atomic.write_json(out / outputs.SPLIT_REPORT, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = cli_args.ArgumentParser(prog="python -m components.split",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--labels", required=True, help="labels CSV (any accepted format)")
    parser.add_argument("--metadata", help="metadata CSV with image and lesion_id columns")
    parser.add_argument("--out", required=True, help="output folder")
    cli_args.add_params_flags(parser)
    cli_args.add_config_flags(parser, SplitConfig)
    parser.add_argument("--previous", metavar="DIR",
                        help="an earlier split's output folder: report what changed since")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = SplitConfig.resolve(cli_args.params_paths(args),
                                  **cli_args.config_flags(args, SplitConfig))
        report = run(args.labels, args.out, config=cfg, metadata=args.metadata,
                     previous=args.previous)
    except (ConfigError, LabelError, ValueError) as err:
        print(f"split: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a read-only or full output folder
        print(f"split: {cli_args.os_error(err)}", file=sys.stderr)
        return 1
    print(json.dumps({k: report[k] for k in ("sizes", "max_class_share_deviation_pp", "split_hash")}
                     | {k: report[k] for k in ("lesions_shared", "test_lesion_leakage", "previous") if k in report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
