"""The pipeline's input: the DVC-versioned raw dataset (`data/raw`: images/, labels.csv,
metadata.csv), materialised into a KFP artifact folder, and its content hash.

Two sources, one result:

* cluster: `dvc.api.DVCFileSystem(repo_url, rev=..., remote=...)` reads `data/raw` of that
  git revision from the DVC remote (S3/MinIO; credentials from the usual AWS_* variables,
  endpoint from `endpoint_url`);
* run-local / tests: a local folder, copied.

The hash is DVC's own directory hash (`<md5>.dir`, what `dvc add data/raw` writes into
`data/raw.dvc`), computed from the files actually materialised, so a run-local hash and a
cluster hash of the same data are the same string. Every artifact the pipeline writes carries
it in `.metadata["data_hash"]` (see pipeline/publish.py).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

def file_md5(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def dir_md5(root: str | Path) -> str:
    """DVC 3's directory hash: md5 of the sorted JSON list of {md5, relpath}, plus '.dir'."""
    root = Path(root)
    entries = [
        {"md5": file_md5(p), "relpath": p.relative_to(root).as_posix()}
        for p in root.rglob("*")
        if p.is_file()
    ]
    entries.sort(key=lambda e: e["relpath"])
    blob = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(blob).hexdigest() + ".dir"


def _dvc_file_md5(text: str) -> str | None:
    """The md5 recorded in a `.dvc` file's first out, if any."""
    import yaml

    outs = (yaml.safe_load(text) or {}).get("outs") or []
    return outs[0].get("md5") if outs else None


def check_dataset_folder(folder: str | Path) -> None:
    """Refuse, in one line naming it, a local raw dataset folder that cannot be one: a
    pipeline started on it would fail steps later under a KFP traceback."""
    import os

    from components.common.config import ConfigError
    from components.common.labels import IMAGE_SUFFIXES

    folder = Path(folder)
    images, labels = folder / "images", folder / "labels.csv"
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
    elif not images.is_dir():
        problem = "has no images/ folder"
    elif not any(os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES
                 for e in os.scandir(images)):  # stops at the first image
        problem = "has no .jpg, .jpeg or .png image in images/"
    elif not labels.is_file():
        problem = "has no labels.csv"
    elif labels.stat().st_size == 0:
        problem = "has an empty labels.csv"
    else:
        return
    raise ConfigError(f"data folder {folder} {problem} (a raw dataset is images/, labels.csv "
                      f"and optionally metadata.csv)")


def materialise(
    out: str | Path,
    *,
    local_path: str = "",
    repo_url: str = "",
    rev: str = "",
    remote: str = "",
    path: str = "data/raw",
    endpoint_url: str = "",
) -> dict:
    """Put the raw dataset at `out` and return its provenance.

    `local_path` wins when given (run-local, tests); otherwise `path` is read from the DVC
    repository `repo_url` at git revision `rev` (empty: the default branch) through the DVC
    remote `remote` (empty: the repository's default remote).
    """
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recorded = None
    if local_path:
        src = Path(local_path)
        if not src.is_dir():
            raise FileNotFoundError(f"local dataset folder {src} does not exist")
        shutil.copytree(src, out)
        source, rev_used = str(src.resolve()), ""
        dvc_file = src.with_name(src.name + ".dvc")
        if dvc_file.is_file():
            recorded = _dvc_file_md5(dvc_file.read_text())
    elif repo_url:
        from dvc.api import DVCFileSystem

        remote_config = {"endpointurl": endpoint_url} if endpoint_url else None
        fs = DVCFileSystem(
            repo_url, rev=rev or None, remote=remote or None, remote_config=remote_config
        )
        try:
            fs.get(path, str(out), recursive=True)
        except Exception as err:  # DVC's own message names neither the remote nor its endpoint
            where = f"DVC remote {remote or '(default)'}" + (f" at {endpoint_url}" if endpoint_url
                                                             else "")
            raise RuntimeError(f"reading {path} of {repo_url}@{rev or 'HEAD'} from {where} "
                               f"failed: {type(err).__name__}: {err}") from err
        try:
            recorded = _dvc_file_md5(fs.read_text(f"{path}.dvc"))
        except FileNotFoundError:
            recorded = None
        source, rev_used = f"{repo_url}#{path}", rev
    else:
        raise ValueError("give either local_path or repo_url to materialise the dataset")

    data_hash = dir_md5(out)
    info = {
        "data_hash": data_hash,
        "data_source": source,
        "data_rev": rev_used,
        "files": sum(1 for p in out.rglob("*") if p.is_file()),
    }
    if recorded and recorded != data_hash:
        # The .dvc file and the files disagree (workspace edited after `dvc add`): say so,
        # and keep the hash of what this run actually used.
        info["dvc_file_md5"] = recorded
    return info
