"""Two data versions in a real git + DVC project: the split stage (`dvc repro`) compares with
its own earlier split and stops on a relabelled image; `skinlesion data diff REV_A REV_B`
reads data/raw at both revisions through DVC and says what changed, and that no kept lesion
moved; two folders work the same."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from components.commands import data as data_command
from components.commands import synth
from components.common.labels import CLASSES

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, text=True,
                          capture_output=True).stdout


def _dvc(repo: Path, env: dict, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, text=True,
                          capture_output=True, timeout=300)
    assert (done.returncode == 0) == ok, done.stdout + done.stderr
    return done


def _version(source: Path, dest: Path, images: list[str], relabel: str | None = None) -> None:
    """data/raw holding `images` of the synthetic set, `relabel` moved to the next class."""
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "images").mkdir(parents=True)
    for image in images:
        shutil.copy(source / "images" / f"{image}.jpg", dest / "images")
    labels = pd.read_csv(source / "labels.csv").set_index("image").loc[images]
    if relabel is not None:
        old = labels.loc[relabel, list(CLASSES)].to_numpy().argmax()
        labels.loc[relabel, list(CLASSES)] = 0.0
        labels.loc[relabel, CLASSES[(old + 1) % len(CLASSES)]] = 1.0
    labels.reset_index().to_csv(dest / "labels.csv", index=False)
    meta = pd.read_csv(source / "metadata.csv").set_index("image").loc[images]
    meta.reset_index().to_csv(dest / "metadata.csv", index=False)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Commits v1 (images 0-79), v2 (10-119: 10 removed, 40 added), v3 (v2, one relabelled),
    each with `dvc repro split` run on it; returns repo, env, v2's relabelled image, and the
    outputs of the three reproductions."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    tmp = tmp_path_factory.mktemp("diff")
    source, repo = tmp / "synth", tmp / "project"
    synth.run(source, n=120, seed=0)
    order = pd.read_csv(source / "labels.csv")["image"].tolist()
    repo.mkdir()
    shutil.copytree(ROOT / "components", repo / "components",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["preprocess"]["size"] = 32
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(repo), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    _git(repo, "init", "-q")
    _dvc(repo, env, "init", "-q")
    relabelled = order[50]
    runs = []
    for name, images, relabel in (("v1", order[:80], None), ("v2", order[10:], None),
                                  ("v3", order[10:], relabelled)):
        _version(source, repo / "data" / "raw", images, relabel)
        _dvc(repo, env, "add", "-q", "data/raw")
        _git(repo, "add", "-A")
        _git(repo, "commit", "-qm", name)
        _git(repo, "tag", name)
        runs.append(_dvc(repo, env, "repro", "split", ok=name != "v3"))
        if name != "v3":
            runs[-1] = json.loads((repo / "data/splits/split_report.json").read_text())
    return repo, env, relabelled, runs


def test_the_dvc_split_stage_compares_with_its_own_earlier_split(project):
    _, _, relabelled, (first, second, third) = project
    assert first["previous"] is None
    assert second["previous"]["images"] == {"new": 40, "kept": 70, "removed": 10}
    assert second["previous"]["moved"] == {"images": 0, "groups": 0}
    error = [line for line in third.stderr.splitlines() if line.startswith("split: ")]
    assert len(error) == 1 and relabelled in error[0] and "--accept_relabel" in error[0], third.stderr
    assert "Traceback" not in third.stderr


def test_data_diff_between_two_revisions(project, capsys, monkeypatch):
    repo, _, relabelled, _ = project
    monkeypatch.chdir(repo)
    assert data_command.main(["diff", "v1", "v2"]) == 0
    out = capsys.readouterr().out
    assert "images: 80 -> 110 (40 added, 10 removed, 0 relabelled)" in out, out
    assert "kept lesions in another split: 0" in out
    assert data_command.main(["diff", "v2", "v3", "--json"]) == 0
    diff = json.loads(capsys.readouterr().out)
    assert diff["relabelled"] == [relabelled] and diff["images"]["new"] == 0
    assert diff["moved"] == {"images": 0, "groups": 0}
    before, after = diff["class_counts"]["before"], diff["class_counts"]["after"]
    assert sum(before.values()) == sum(after.values()) == 110
    assert sum(abs(after[c] - before[c]) for c in CLASSES) == 2  # one image left one class


def test_data_diff_between_two_folders_and_a_bad_revision(project, tmp_path, capsys, monkeypatch):
    repo, _, _, _ = project
    monkeypatch.chdir(repo)
    for rev in ("v1", "v2"):
        _git(repo, "checkout", "-q", rev, "--", "data/raw.dvc")
        subprocess.run([str(BIN / "dvc"), "checkout", "-q", "data/raw"], cwd=repo, check=True)
        shutil.copytree(repo / "data/raw", tmp_path / rev)
    _git(repo, "checkout", "-q", "v3", "--", "data/raw.dvc")
    assert data_command.main(["diff", str(tmp_path / "v1"), str(tmp_path / "v2")]) == 0
    assert "images: 80 -> 110 (40 added, 10 removed, 0 relabelled)" in capsys.readouterr().out
    assert data_command.main(["diff", "v1", "no-such-rev"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("data diff: ") and "no-such-rev" in err and "\n" not in err, err


def test_data_diff_fails_when_kept_lesions_moved(project, capsys, monkeypatch):
    """Another split.seed in the later revision: the same images, most lesions elsewhere."""
    repo, _, _, _ = project
    monkeypatch.chdir(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["split"]["seed"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    _git(repo, "commit", "-qam", "split.seed 1")
    assert data_command.main(["diff", "v3", "HEAD"]) == 1
    out, err = capsys.readouterr()
    assert "images: 110 -> 110 (0 added, 0 removed, 0 relabelled)" in out
    moved = int(out.split("kept lesions in another split: ")[1].split()[0])
    assert moved > 10, out
    assert err.strip() == (f"data diff: {moved} kept lesions changed split between v3 and HEAD "
                           f"(their split settings differ?)")
