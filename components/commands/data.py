"""`skinlesion data diff A B`: what changed between two versions of the dataset.

A and B are git revisions of the project (any branch, tag or commit whose data/raw.dvc
differs; data/raw is read through DVC's API, from the cache or the remote, with that
revision's params.yaml for the split), or two folders holding labels.csv and metadata.csv.
Prints images added, removed and relabelled, class counts before and after, and how many
kept images (and lesions) are in another split under each version's split settings: 0 for
the stable grouped split unless its settings changed (exit status 1 then).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

from components import split
from components.common import cli_args
from components.common.config import ConfigError, SplitConfig
from components.common.labels import CLASSES, LabelError

LABELS, METADATA = "labels.csv", "metadata.csv"
RAW = "data/raw"  # params.yaml's data.raw, where a revision does not say


class VersionError(ValueError):
    """A data version that cannot be read; the message names the revision or folder."""


def _from_revision(repo: str, rev: str, scratch: Path) -> tuple[Path, SplitConfig]:
    """That revision's data/raw labels and metadata copied into `scratch`, and its split
    settings. (dvc.api reads one file; read_labels wants a path, hence the copy.)"""
    import dvc.api  # noqa: PLC0415  (DVC is slow to import; folders do not need it)
    from dvc.exceptions import DvcException  # noqa: PLC0415
    from scmrepo.exceptions import SCMError  # noqa: PLC0415

    try:
        params = yaml.safe_load(dvc.api.read("params.yaml", repo=repo, rev=rev)) or {}
        raw = (params.get("data") or {}).get("raw", RAW)
        for name in (LABELS, METADATA):
            try:
                data = dvc.api.read(f"{raw}/{name}", repo=repo, rev=rev, mode="rb")
            except FileNotFoundError:
                if name == LABELS:
                    raise
                continue
            (scratch / name).write_bytes(data)
    except (DvcException, SCMError, FileNotFoundError) as err:
        raise VersionError(f"{rev}: cannot read its data ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else 'not found'})") from None
    return scratch, SplitConfig.resolve(params, source=f"params.yaml at {rev}")


def _version(name: str, repo: str, scratch: Path, folder_cfg: SplitConfig):
    """(versioned frame, class counts) of a folder or a revision."""
    folder, cfg = (Path(name), folder_cfg) if Path(name).is_dir() else \
        _from_revision(repo, name, scratch)
    metadata = folder / METADATA
    try:
        table = split.read_table(folder / LABELS, metadata if metadata.is_file() else None)
        frame = split.versioned(table, split.assign(table, cfg))
    except (LabelError, ValueError) as err:  # a temporary copy's path means nothing to the user
        raise VersionError(str(err).replace(f"{scratch}/", f"{name}:{RAW}/")) from None
    counts = np.bincount(table["label"], minlength=len(CLASSES))
    return frame, dict(zip(CLASSES, counts.tolist()))


def diff(before: str, after: str, repo: str = ".", folder_cfg: SplitConfig | None = None) -> dict:
    """split.compare() of two versions, with their class counts."""
    folder_cfg = folder_cfg or SplitConfig()
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        (old, old_counts), (new, new_counts) = (
            _version(name, repo, Path(scratch), folder_cfg) for name, scratch in ((before, a), (after, b)))
    return {"before": before, "after": after, **split.compare(old, new),
            "class_counts": {"before": old_counts, "after": new_counts}}


def _text(d: dict) -> str:
    images, groups, counts = d["images"], d["groups"], d["class_counts"]
    relabelled = d["relabelled"]
    lines = [f"data diff {d['before']} -> {d['after']}",
             f"images: {images['kept'] + images['removed']} -> {images['kept'] + images['new']} "
             f"({images['new']} added, {images['removed']} removed, {len(relabelled)} relabelled)",
             f"lesions (an image without one counts as one): {groups['new']} new, "
             f"{groups['kept']} kept, {groups['removed']} removed"]
    if relabelled:
        lines.append(f"relabelled: {', '.join(relabelled[:10])}{', ...' if len(relabelled) > 10 else ''}")
    lines.append("class   before  after")
    lines += [f"{c:<6} {counts['before'][c]:>7} {counts['after'][c]:>6}" for c in CLASSES]
    lines.append(f"kept lesions in another split: {d['moved']['groups']} "
                 f"({d['moved']['images']} images; 0 unless the split settings changed)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = cli_args.ArgumentParser(prog="skinlesion data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    compare = commands.add_parser("diff", help="what changed between two data versions")
    compare.add_argument("before", help="git revision, or a folder with labels.csv")
    compare.add_argument("after", help="git revision, or a folder with labels.csv")
    compare.add_argument("--repo", default=".", help="the project (default: here)")
    compare.add_argument("--json", action="store_true", help="print JSON instead of text")
    cli_args.add_params_flags(compare)
    args = parser.parse_args(argv)
    try:
        result = diff(args.before, args.after, args.repo,
                      SplitConfig.resolve(cli_args.params_paths(args)))
    except (ConfigError, VersionError) as err:
        print(f"data diff: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else _text(result))
    if moved := result["moved"]["groups"]:
        print(f"data diff: {moved} kept lesion{'s' * (moved != 1)} changed split between "
              f"{args.before} and {args.after} (their split settings differ?)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
