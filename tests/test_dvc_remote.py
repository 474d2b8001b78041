"""DVC round trip through an S3 remote: dvc add, push to moto's S3 server, wipe, pull, compare bytes."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from components.commands import synth
from s3server import FAKE_AWS_ENV

DVC = Path(sys.executable).with_name("dvc")
BUCKET = "dvc-test"


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """Subprocess environment: fake AWS credentials only, no user config, no analytics."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, **FAKE_AWS_ENV,
            "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
            "DVC_NO_ANALYTICS": "1",
            "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site-cache")}


def test_dvc_push_pull_through_s3_remote(tmp_path: Path, env: dict[str, str], s3_endpoint: str):
    if not DVC.is_file():
        pytest.skip(f"dvc CLI not found at {DVC}")
    repo = tmp_path / "repo"
    repo.mkdir()

    def sh(*args: str) -> str:
        done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    synth.run(repo / "data" / "raw", n=24, seed=3)
    expected = _digests(repo / "data" / "raw")

    boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id=FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
                 region_name=FAKE_AWS_ENV["AWS_DEFAULT_REGION"]).create_bucket(Bucket=BUCKET)
    sh("git", "init", "-q")
    sh(str(DVC), "init", "-q")
    sh(str(DVC), "add", "data/raw")
    sh(str(DVC), "remote", "add", "-d", "storage", f"s3://{BUCKET}/cache")
    sh(str(DVC), "remote", "modify", "storage", "endpointurl", s3_endpoint)
    sh(str(DVC), "push")

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data" / "raw")
    sh(str(DVC), "pull")

    assert _digests(repo / "data" / "raw") == expected
    config = (repo / ".dvc" / "config").read_text()
    assert s3_endpoint in config
    assert FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"] not in config  # credentials stay in the environment
