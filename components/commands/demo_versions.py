"""`skinlesion demo --versions 2`: the dataset-version loop, on a scratch copy of the project.

1. the scratch copy (demo.make_copy) with params.yaml = params.yaml + the demo's small settings,
   committed, and a registered model of its own (`<model_name>-<demo name>`), so that the first
   promote makes the first champion whatever the MLflow store already holds;
2. version 1: about 60% of the dataset's lesions (a hash of each lesion id, so the same
   lesions every time; an image without a lesion id counts as one), `dvc add data/raw`,
   `dvc repro` (the six stages, register included), the results committed and tagged
   `data-v1`; `skinlesion promote` makes it champion;
3. version 2: all the images, the same again (`data-v2`); the split stage keeps every
   version-1 lesion in its split, and promote compares the two models on the same images:
   version 2's test images, less any in version 1's train/val lesions (none, with the stable
   split), decided by the lesion-level paired interval against register.min_delta;
4. `skinlesion data diff data-v1 data-v2`: what was added, class counts, 0 lesions moved.

`dvc repro` rather than `exp run --temp`: promote reads the challenger's split CSVs and
prepared images, which a temporary experiment folder deletes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import yaml

from components import split
from components.commands import data, demo, experiments, promote, venv
from components.common import outputs
from components.common.config import PARAMS_FILE, RegisterConfig, load_params
from components.evaluation.metrics import paired_gate

VERSION_1_SHARE = 0.6
# the hash that picks version 1's lesions; not split.seed, whose hash cut at the same place
# would give version 1 no test lesions
VERSION_SEED = "demo-version-1"
LABELS, METADATA = "labels.csv", "metadata.csv"


def version_1(full: Path, out: Path) -> tuple[int, int]:
    """About VERSION_1_SHARE of `full`'s lesions (labels, metadata, hard-linked images) in
    `out`; returns its image count and `full`'s. The rows are copied as they are (ISIC's
    columns)."""
    labels = pd.read_csv(full / LABELS, dtype=str, keep_default_na=False)
    meta = pd.read_csv(full / METADATA, dtype=str, keep_default_na=False) \
        if (full / METADATA).is_file() else pd.DataFrame({"image": labels["image"]})
    lesions = labels[["image"]].merge(meta, on="image", how="left")
    if "lesion_id" in lesions:
        lesions["lesion_id"] = lesions["lesion_id"].mask(lesions["lesion_id"] == "")
    groups = split.group_keys(lesions).to_numpy()
    kept = set(labels["image"][split.hashed_split(groups, 0.0, 1 - VERSION_1_SHARE,
                                                  VERSION_SEED) == 0])
    (out / "images").mkdir(parents=True)
    labels[labels["image"].isin(kept)].to_csv(out / LABELS, index=False)
    if (full / METADATA).is_file():
        meta[meta["image"].isin(kept)].to_csv(out / METADATA, index=False)
    for image in (full / "images").iterdir():
        if image.stem in kept:
            os.link(image, out / "images" / image.name)
    return len(kept), len(labels)


def _git(dest: Path, env: dict, *args: str) -> None:
    subprocess.run(["git", *args], cwd=dest, env=env, check=True, stdout=subprocess.DEVNULL)


def _version(dest: Path, env: dict, source: Path, tag: str, cfg: RegisterConfig) -> dict:
    """data/raw := `source`, committed under DVC; `dvc repro`; results committed and tagged;
    then promote. Returns promote's result."""
    raw = dest / "data" / "raw"
    shutil.rmtree(raw, ignore_errors=True)
    shutil.copytree(source, raw, copy_function=os.link)
    dvc = venv.tool("dvc")
    subprocess.run([dvc, "add", "--quiet", "data/raw"], cwd=dest, env=env, check=True)
    _git(dest, env, "add", "-A")
    _git(dest, env, "commit", "-qm", f"{tag}: data/raw")
    print(f"\n== {tag}: dvc repro", flush=True)
    returncode, _ = experiments.stream([dvc, "repro"], dest, env,
                                       experiments._stage_count(dest / "dvc.yaml"))
    if returncode:
        raise RuntimeError(f"dvc repro of {tag} failed (exit {returncode})")
    _git(dest, env, "add", "-A")
    _git(dest, env, "commit", "-qm", f"{tag}: dvc repro")
    _git(dest, env, "tag", tag)
    print(experiments.summary(_results(dest)), flush=True)
    result = promote.run(config=cfg, tracking_uri=env["MLFLOW_TRACKING_URI"],
                         split_dir=dest / outputs.SPLITS_DIR,
                         img_dir=dest / outputs.PREPARED_DIR / outputs.PREPARED_IMAGES)
    print(f"promote: {result['decision']}: {result['reason']}", flush=True)
    return result


def _results(dest: Path) -> dict:
    read = lambda rel: json.loads((dest / rel).read_text())  # noqa: E731
    return {"metrics": read(f"outputs/eval/{outputs.METRICS}"),
            "registration": read(experiments.REGISTRATION_FILE)}


def _settings(dest: Path, override: str, name: str) -> RegisterConfig:
    """The copy's params.yaml with the demo's settings merged in and a model name of its own."""
    params = load_params([dest / PARAMS_FILE, dest / override])
    params["register"]["model_name"] = f"{params['register']['model_name']}-{name}"
    (dest / PARAMS_FILE).write_text(yaml.safe_dump(params, sort_keys=False))
    return RegisterConfig.resolve(params, source=str(dest / PARAMS_FILE))


def run(root: str | os.PathLike = ".", n: int = 400, seed: int = 0,
        override: str = "params.demo.yaml", name: str | None = None) -> dict:
    """Both versions from the project at `root`; returns {copy, tracking_uri, model_name,
    v1, v2 (promote's results), diff (data.diff's), images (per version)}."""
    root = Path(root).resolve()
    name = name or time.strftime("demo-%Y%m%d-%H%M%S")
    dest = demo.scratch(root, name)
    env = experiments.environment(root)
    demo.make_copy(root, dest, env)
    cfg = _settings(dest, override, name)
    _git(dest, env, "commit", "-qam", f"the demo's settings ({override})")
    full = root / demo.SCRATCH / f"{name}.all"  # beside the copy: not in its git repository
    print(f"data: {demo.full_data(root, full, n, seed)}", flush=True)
    v1 = dest.parent / f"{name}.v1"
    images = dict(zip(("data-v1", "data-v2"), version_1(full, v1)))
    print(f"version 1: {images['data-v1']} of the {images['data-v2']} images (about "
          f"{VERSION_1_SHARE:.0%} of the lesions); version 2: all", flush=True)
    results = {tag: _version(dest, env, source, tag, cfg)
               for tag, source in (("data-v1", v1), ("data-v2", full))}
    change = data.diff("data-v1", "data-v2", str(dest))
    return {"copy": str(dest), "tracking_uri": env["MLFLOW_TRACKING_URI"],
            "model_name": cfg.model_name, "images": images, "v1": results["data-v1"],
            "v2": results["data-v2"], "diff": change}


def comparison(result: dict) -> str:
    """The paired comparison of version 2's model with version 1's, and the data diff."""
    p, v2 = result["v2"]["paired"], result["v2"]
    lines = [f"\nThe two versions ({result['model_name']}, copy {result['copy']}):"]
    if p is None:
        lines.append(f"  no paired comparison: {v2['decision']}: {v2['reason']}")
    else:
        lines += [
            f"  images compared: {p['n_images']} ({p['n_lesions']} lesions), version 2's test "
            f"split less {p['n_left_out']} in version 1's train/val lesions",
            f"  {p['metric']}: challenger v{v2['challenger']} {p['challenger']:.4f}, champion "
            f"v{result['v1']['champion']} {p['champion']:.4f}",
            f"  difference {p['difference']:+.4f}, 95% paired interval "
            f"[{promote._fmt(p['low'])}, {promote._fmt(p['high'])}], min_delta "
            f"{v2['min_delta']}: lower bound {'clears' if paired_gate(p, v2['min_delta']) else 'does not clear'} it",
            f"  decision: {v2['decision']}"]
    return "\n".join([*lines, "", data._text(result["diff"])])


def main(root: str, n: int, seed: int, override: str, name: str | None) -> int:
    started = time.monotonic()
    result = run(root, n=n, seed=seed, override=override, name=name)
    print(comparison(result))
    print(f"\n{time.monotonic() - started:.0f} s. `cd {result['copy']} && git log --oneline` "
          f"shows the two versions; `skinlesion tracking-server` the model's versions and tags.")
    return 0

