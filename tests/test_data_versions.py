"""Issue 27 item 4: the dataset-version loop end to end (`skinlesion demo --versions 2`'s
machinery) on a temporary git + DVC project: version 1 = about 60% of the lesions, version 2 =
all of them, two commits with data/raw under DVC; each trained (tiny preset, 32 px, 1 epoch),
registered and promoted against a real `mlflow server`.

Data: 635 real HAM10000 images from ../shared/data (the first 60 lesions of each class by
lesion id, all their images) when present, else the synthetic twin (`skinlesion synth`, 400
images, the demo's default)."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import SHARED_DATA
from components import split
from components.commands import demo_versions, venv
from components.evaluation.metrics import paired_gate

ROOT = Path(__file__).resolve().parents[1]
HAM = SHARED_DATA / "ham10000-200x150"
LESIONS_PER_CLASS = 60
TINY = """\
preprocess: {size: 40}
split: {seed: 11}
train: {preset: tiny, img_size: 32, epochs: 1, batch_size: 32, warmup_epochs: 0,
        num_workers: 0, ema_decay: 0.9, mixup_alpha: 0.0, self_supervised_epochs: 0}
evaluate: {bootstrap: 20}
"""


def real_subset(out: Path) -> None:
    """The first LESIONS_PER_CLASS lesions (by id) of each HAM10000 class, all their images,
    in ISIC's layout (labels.csv, metadata.csv image,lesion_id; images hard-linked)."""
    labels = pd.read_csv(HAM / "labels.csv", dtype=str)
    meta = pd.read_csv(HAM / "ham10000_metadata.csv", usecols=["image", "lesion_id", "dx"])
    first = meta.sort_values("lesion_id").drop_duplicates("lesion_id").groupby("dx").head(
        LESIONS_PER_CLASS)["lesion_id"]
    meta = meta[meta["lesion_id"].isin(first)]
    (out / "images").mkdir(parents=True)
    labels[labels["image"].isin(meta["image"])].to_csv(out / "labels.csv", index=False)
    meta[["image", "lesion_id"]].to_csv(out / "metadata.csv", index=False)
    for image in meta["image"]:
        os.link(HAM / "images" / f"{image}.jpg", out / "images" / f"{image}.jpg")


def _project(tmp: Path) -> Path:
    """A git + DVC checkout of the project's code with data/raw (untracked, as a user's)."""
    repo = tmp / "project"
    for name in ("components", "model", "pipeline"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", "pyproject.toml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    (repo / "tiny.yaml").write_text(TINY)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    for command in (["git", "init", "-q"], [venv.tool("dvc"), "init", "-q"],
                    ["git", "add", "-A"], ["git", "commit", "-qm", "project"]):
        subprocess.run(command, cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL)
    if (HAM / "labels.csv").is_file():
        real_subset(repo / "data" / "raw")
    return repo  # without data/raw the demo makes the synthetic twin


@pytest.fixture(scope="module")
def loop(mlflow_server, tmp_path_factory):
    repo = _project(tmp_path_factory.mktemp("versions"))
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "OMP_NUM_THREADS")}
    os.environ.update(MLFLOW_TRACKING_URI=mlflow_server, OMP_NUM_THREADS="2")
    for role in ("AUTHOR", "COMMITTER"):
        os.environ.setdefault(f"GIT_{role}_NAME", "t")
        os.environ.setdefault(f"GIT_{role}_EMAIL", "t@example.com")
    try:
        yield demo_versions.run(repo, override="tiny.yaml", name="two")
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def _split_at(copy: str, rev: str, name: str) -> pd.DataFrame:
    import dvc.api

    return pd.read_csv(io.StringIO(dvc.api.read(f"data/splits/{name}.csv", repo=copy, rev=rev)),
                       dtype=str)


@pytest.mark.slow
def test_two_data_versions_train_register_and_promote_on_the_same_images(loop):
    copy, images = loop["copy"], loop["images"]
    assert 0.45 < images["data-v1"] / images["data-v2"] < 0.75  # about 60% of the lesions

    # no version-1 training or validation lesion is in version 2's test split
    seen = pd.concat([_split_at(copy, "data-v1", s) for s in ("train", "val")])
    test_v2 = _split_at(copy, "data-v2", "test")
    assert len(test_v2) > 0
    assert not set(split.group_keys(test_v2)) & set(split.group_keys(seen))

    # version 1 became the first champion; version 2 was compared with it on the same images
    assert loop["v1"]["decision"] == "first"
    v2, paired = loop["v2"], loop["v2"]["paired"]
    assert paired is not None, v2["reason"]
    assert paired["n_test"] == len(test_v2)
    assert paired["n_images"] + paired["n_left_out"] == paired["n_test"]
    assert paired["n_left_out"] == 0  # the stable split: v2's test lesions were never v1's
    client = MlflowClient(loop["tracking_uri"])
    one, two = loop["v1"]["challenger"], v2["challenger"]
    for version, other in ((two, one), (one, two)):
        tag = client.get_model_version(loop["model_name"], version).tags[f"paired_vs_v{other}"]
        assert f'"n_images":{paired["n_images"]}' in tag

    # the decision is the paired rule: the interval's lower bound against min_delta
    promoted = paired_gate(paired, v2["min_delta"])
    assert v2["decision"] == ("promoted" if promoted else "kept")
    champion = client.get_model_version_by_alias(loop["model_name"], "champion").version
    assert champion == (two if promoted else one)

    # data diff between the two commits: the images added, no kept lesion moved
    diff = loop["diff"]
    assert diff["images"]["new"] == images["data-v2"] - images["data-v1"]
    assert diff["images"]["removed"] == 0 and diff["moved"]["groups"] == 0
    text = demo_versions.comparison(loop)
    assert f"images compared: {paired['n_images']}" in text and "kept lesions in another split: 0" in text
