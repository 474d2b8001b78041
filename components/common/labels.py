"""ISIC 2019 labels: the class order used everywhere, and the one reader for every label format.

Formats `read_labels` accepts (the format is told apart by the header):

- integer: `image,label`, where label is a class index (0-7) or a class name;
- one-hot: `image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC` with 0/1 (or 0.0/1.0) values;
- the official `ISIC_2019_Training_GroundTruth.csv`: one-hot floats plus an `UNK` column.

A row that is not exactly one known class, a duplicate id, an empty file or (when an image
folder is given) a missing image raises `LabelError` naming the file and the line.
Line numbers count the header as line 1, as an editor shows them.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

# ISIC 2019 ground-truth column order; integer labels index this tuple.
CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
CLASS_INDEX = {name: i for i, name in enumerate(CLASSES)}

# The official ground truth's "unknown" column: never a valid training label.
UNKNOWN = "UNK"
# Columns a one-hot or integer file may carry besides the labels themselves.
PASSTHROUGH = ("lesion_id", "source")
UNKNOWN_SOURCE = "unknown"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class LabelError(ValueError):
    """A label file is unusable; the message names the file and, where there is one, the line."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str):
        self.path, self.line = Path(path), line
        where = f"{self.path}, line {line}" if line is not None else str(self.path)
        super().__init__(f"{where}: {message}")


def _line(row_index: int) -> int:
    """File line of a 0-based data row (the header is line 1)."""
    return row_index + 2


def _read_csv(path: Path) -> pd.DataFrame:
    """Read a CSV as strings; `utf-8-sig` drops a BOM and pandas accepts CRLF line ends."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise LabelError(path, None, f"not UTF-8 text (saved as UTF-16 or another encoding? "
                                     f"save it as UTF-8 CSV): {err.reason} at byte {err.start}"
                         ) from None
    except pd.errors.EmptyDataError:
        raise LabelError(path, None, "empty file") from None
    except pd.errors.ParserError as err:
        raise LabelError(path, None, f"not a valid CSV: {err}") from None
    table.columns = [str(c).strip() for c in table.columns]
    if table.empty:
        raise LabelError(path, None, "no rows under the header")
    return table.apply(lambda col: col.str.strip())


def _check_ids(path: Path, ids: pd.Series) -> None:
    """Ids must be present, unique and plain file stems (`_downsampled` names are fine)."""
    for i, image in ids.items():
        if not image:
            raise LabelError(path, _line(i), "empty image id")
        if "/" in image or "\\" in image:
            raise LabelError(path, _line(i), f"image id {image!r} contains a path separator")
    dup = ids.duplicated(keep="first")
    if dup.any():
        i = int(dup.to_numpy().nonzero()[0][0])
        first = int((ids == ids[i]).to_numpy().nonzero()[0][0])
        raise LabelError(path, _line(i), f"duplicate image id {ids[i]!r} (first on line {_line(first)})")


def _integer_labels(path: Path, values: pd.Series) -> list[int]:
    labels = []
    for i, value in values.items():
        if value.isdigit() and int(value) < len(CLASSES):
            labels.append(int(value))
        elif value.upper() in CLASS_INDEX:
            labels.append(CLASS_INDEX[value.upper()])
        else:
            raise LabelError(path, _line(i), f"unknown class {value!r}; expected 0-{len(CLASSES) - 1} or one of {', '.join(CLASSES)}")
    return labels


def _one_hot_labels(path: Path, table: pd.DataFrame) -> list[int]:
    columns = [*CLASSES, UNKNOWN] if UNKNOWN in table.columns else list(CLASSES)
    try:
        hot = table[columns].astype(float)
    except ValueError:
        bad = table[columns].apply(pd.to_numeric, errors="coerce").isna().any(axis=1)
        i = int(bad.to_numpy().nonzero()[0][0])
        raise LabelError(path, _line(i), f"non-numeric one-hot value in {table.loc[i, columns].tolist()}") from None
    labels = []
    for i, row in zip(table.index, hot.to_numpy()):
        if not set(row) <= {0.0, 1.0}:
            raise LabelError(path, _line(i), f"one-hot values must be 0 or 1, got {row.tolist()}")
        chosen = [columns[j] for j in row.nonzero()[0]]
        if chosen == [UNKNOWN]:
            raise LabelError(path, _line(i), "row is labelled UNK, not one of the eight classes")
        if len(chosen) != 1:
            what = "no class" if not chosen else f"several classes ({', '.join(chosen)})"
            raise LabelError(path, _line(i), f"row is not exactly one class: {what}")
        labels.append(CLASS_INDEX[chosen[0]])
    return labels


def _parse(path: Path, table: pd.DataFrame) -> pd.DataFrame:
    """Turn any accepted format into image,label,class_name (+ lesion_id when the file has it)."""
    if table.columns[0] != "image":
        raise LabelError(path, 1, f"first column must be 'image', got {table.columns[0]!r}")
    integer = "label" in table.columns
    if integer:
        known = {"image", "label", *PASSTHROUGH}
    else:
        missing = [c for c in CLASSES if c not in table.columns]
        if missing:
            raise LabelError(path, 1, f"header has neither a 'label' column nor all class columns (missing {', '.join(missing)})")
        known = {"image", *CLASSES, UNKNOWN, *PASSTHROUGH}
    unknown = [c for c in table.columns if c not in known]
    if unknown:
        raise LabelError(path, 1, f"unknown class or column {', '.join(map(repr, unknown))}; classes are {', '.join(CLASSES)}")
    _check_ids(path, table["image"])
    labels = _integer_labels(path, table["label"]) if integer else _one_hot_labels(path, table)
    out = pd.DataFrame({"image": table["image"], "label": labels})
    out["class_name"] = [CLASSES[k] for k in labels]
    for column in PASSTHROUGH:
        if column in table.columns:
            out[column] = table[column].replace("", pd.NA).astype("string")
    return out


def _attach_lesions(labels: pd.DataFrame, metadata: Path) -> pd.DataFrame:
    """Add `lesion_id` (and `source`, when it has one) from a metadata CSV; an image it does
    not list gets none (<NA>)."""
    meta = _read_csv(metadata)
    for column in ("image", "lesion_id"):
        if column not in meta.columns:
            raise LabelError(metadata, 1, f"metadata has no {column!r} column")
    _check_ids(metadata, meta["image"])
    meta = meta.set_index("image")
    columns = [c for c in PASSTHROUGH if c in meta.columns]
    out = labels.drop(columns=columns, errors="ignore")
    for column in columns:
        out[column] = labels["image"].map(meta[column].replace("", pd.NA)).astype("string")
    return out


def sources(table: pd.DataFrame) -> pd.Series:
    """Where each image comes from: its `source` column, else its lesion id's prefix (ISIC
    2019: BCN, HAM, MSK4), else "unknown" (the older ISIC Archive collections have no lesion
    id)."""
    if "source" in table.columns:
        given = table["source"]
    else:
        given = pd.Series(pd.NA, index=table.index, dtype="string")
    if "lesion_id" in table.columns:
        prefix = table["lesion_id"].str.extract(r"^([A-Za-z0-9]+)_", expand=False)
        given = given.fillna(prefix)
    return given.fillna(UNKNOWN_SOURCE).astype(str)


def image_index(images_dir: str | os.PathLike) -> dict[str, Path]:
    """Map image id -> file for every .jpg/.jpeg/.png in a folder (one directory listing)."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {images_dir}")
    index: dict[str, Path] = {}
    for entry in sorted(os.scandir(images_dir), key=lambda e: e.name):
        path = Path(entry.path)
        if path.suffix.lower() in IMAGE_SUFFIXES and _is_file(entry):
            if path.stem in index:  # A.jpg and A.png, or B.jpg and B.JPG: which is the image?
                raise LabelError(images_dir, None, f"image {path.stem!r} has two files, "
                                                   f"{index[path.stem].name} and {path.name}; "
                                                   f"keep one")
            index[path.stem] = path
    return index


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:  # a symlink loop: named as an image, so the step reading it says why
        return True


def find_image(images_dir: str | os.PathLike, image_id: str) -> Path:
    """Path of `<image_id>.jpg`, `.jpeg` or `.png` (any case) in `images_dir`."""
    images_dir = Path(images_dir)
    for suffix in IMAGE_SUFFIXES:
        for candidate in (images_dir / f"{image_id}{suffix}", images_dir / f"{image_id}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"no image {image_id!r} (.jpg/.jpeg/.png) in {images_dir}")


def reconcile(labels: pd.DataFrame, images: str | os.PathLike | dict[str, Path]) -> tuple[list[str], list[str]]:
    """(labelled ids with no image, image ids with no label), each sorted.

    `images`: a folder, or the mapping `image_index` already built for it.
    """
    found = set(images if isinstance(images, dict) else image_index(images))
    labelled = set(labels["image"])
    return sorted(labelled - found), sorted(found - labelled)


def read_labels(csv: str | os.PathLike, metadata: str | os.PathLike | None = None,
                images_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read labels in any accepted format into columns image, label, class_name[, lesion_id].

    `metadata`: a CSV with image and lesion_id columns (the official metadata file works).
    `images_dir`: when given, every labelled image must exist there.
    """
    csv = Path(csv)
    labels = _parse(csv, _read_csv(csv))
    if metadata is not None:
        labels = _attach_lesions(labels, Path(metadata))
    if images_dir is not None:
        found = image_index(images_dir)
        for i, image in labels["image"].items():
            if image not in found:
                raise LabelError(csv, _line(i), f"image {image!r} not found in {images_dir}")
    return labels
