"""A training run's inputs as one object: the split CSVs, the prepared images, the class
weights, and the version of the data they came from.

`TrainingData.read` is called once per run (by components/train.py from its flags, or by a
caller) and is the one place that reads the steps' reports beside the inputs and hashes the
input files; the rest of the training takes what it needs from the object:

    input_digest  the settings fingerprint's input part (out_dir.settings_fingerprint): the
                  files whose change changes the trained weights
    lineage       what made the inputs: split_report.json (mode, split_hash) beside the train
                  CSV, preprocess_report.json (size, colour constancy) beside the images
    version       the project's git commit and the DVC hash in its data/raw.dvc
    data_hash     the name MLflow gives the data: that DVC hash, else the preprocess manifest's
                  md5, else one over the split CSVs
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from components.common import outputs, tracking

PathLike = str | os.PathLike


class UnreadableInput(ValueError):
    """A report or DVC file beside the inputs that cannot be parsed; the message names it and
    its line, never its content."""


@dataclass(frozen=True)
class DataVersion:
    """Which data the project held: its git commit (or "unknown") and the md5 DVC recorded in
    data/raw.dvc (None: the data is not DVC-versioned)."""
    commit: str
    dvc_hash: str | None
    committed: bool  # data/raw.dvc is the commit's own: the commit reproduces the data

    @property
    def rev(self) -> str | None:
        """The git revision that holds this data (`dvc checkout` at it gets the same files);
        None when data/raw.dvc is missing, or edited since the commit."""
        return self.commit if self.dvc_hash and self.committed else None

    @classmethod
    def of(cls, project: Path) -> "DataVersion":
        commit = tracking.git_commit(project)
        return cls(commit, _dvc_hash(project / outputs.RAW_DATA_DVC),
                   committed=commit != "unknown" and _unchanged(project, outputs.RAW_DATA_DVC))


def _dvc_hash(dvc_file: Path) -> str | None:
    """The md5 `dvc add` recorded in dvc_file (without DVC's ".dir"), None without the file."""
    if not dvc_file.is_file():
        return None
    try:
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
        return str(outs[0].get("md5") or "").removesuffix(".dir") or None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UnreadableInput(f"{dvc_file}: not valid YAML{where}") from None
    except (AttributeError, IndexError, TypeError):
        raise UnreadableInput(f"{dvc_file}: not a DVC file (no outs: - md5: ...)") from None


def _unchanged(repo: Path, path: str) -> bool:
    """Whether `path` is tracked by git in `repo` and the same as in its HEAD commit (git
    status lists an edited, staged, untracked or ignored file; nothing for a committed one)."""
    try:
        status = subprocess.run(["git", "status", "--porcelain", "--ignored", "--", path],
                                cwd=repo, capture_output=True, text=True, timeout=10,
                                check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return status.strip() == ""


@dataclass(frozen=True)
class TrainingData:
    """The files a training reads (paths as given) and what was derived from them once."""
    train_csv: PathLike
    img_dir: PathLike
    val_csv: PathLike | None
    test_csv: PathLike | None
    class_weights: PathLike | None
    project: Path
    input_digest: str
    lineage: dict = field(compare=False)
    version: DataVersion
    data_hash: str

    @classmethod
    def read(cls, train_csv: PathLike, img_dir: PathLike, *, val_csv: PathLike | None = None,
             test_csv: PathLike | None = None, class_weights: PathLike | None = None,
             project: PathLike | None = None) -> "TrainingData":
        """project: the project whose data/raw.dvc versions the data (default:
        tracking.project_root(), DVC_ROOT under dvc)."""
        root = Path(project).resolve() if project is not None else tracking.project_root()
        version = DataVersion.of(root)
        report = Path(img_dir).parent / outputs.PREPROCESS_REPORT
        return cls(train_csv=train_csv, img_dir=img_dir, val_csv=val_csv, test_csv=test_csv,
                   class_weights=class_weights, project=root,
                   input_digest=_digest(hashlib.sha256(), [
                       train_csv, val_csv, class_weights, report if report.is_file() else None]),
                   lineage=_lineage(train_csv, img_dir), version=version,
                   data_hash=version.dvc_hash or _data_hash(img_dir, train_csv, val_csv))

    def without_validation(self) -> "TrainingData":
        """The same inputs with no validation split (an overfit check validates on training
        images)."""
        return self.read(self.train_csv, self.img_dir, test_csv=self.test_csv,
                         class_weights=self.class_weights, project=self.project)

    def params(self) -> dict[str, str]:
        """The input paths as the run's MLflow params and checkpoint record them."""
        return {"train_csv": str(self.train_csv), "val_csv": str(self.val_csv),
                "test_csv": str(self.test_csv), "img_dir": str(self.img_dir),
                "class_weights": str(self.class_weights)}


def _digest(digest, paths: list) -> str:
    """`digest` (a hashlib object) over each file's bytes, "-" for an absent one."""
    for path in paths:
        digest.update(Path(path).read_bytes() if path else b"-")
    return digest.hexdigest()


def _data_hash(img_dir: PathLike, train_csv: PathLike, val_csv: PathLike | None) -> str:
    """Without DVC: the preprocess manifest next to the images names every source image; else
    the split CSVs themselves."""
    manifest = Path(img_dir).parent / outputs.MANIFEST
    return _digest(hashlib.md5(), [manifest] if manifest.is_file() else
                   [p for p in (train_csv, val_csv) if p])


def _lineage(train_csv: PathLike, img_dir: PathLike) -> dict:
    split = _read_json(Path(train_csv).parent / outputs.SPLIT_REPORT)
    prep = _read_json(Path(img_dir).parent / outputs.PREPROCESS_REPORT)
    return {"split_mode": split.get("mode"), "split_hash": split.get("split_hash"),
            "prepare_size": prep.get("size"),
            "color_constancy": prep.get("color_constancy", "none"),
            "minkowski_p": prep.get("minkowski_p", 6.0),
            "preprocess_corrupt": (prep.get("counts") or {}).get("corrupt")}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        found = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UnreadableInput(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(found, dict):
        raise UnreadableInput(f"{path}: not a JSON object")
    return found
