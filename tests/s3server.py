"""A real S3 endpoint for tests: moto's standalone server as a subprocess on 127.0.0.1.

    from s3server import moto_s3_server        # tests/ is on sys.path under pytest

    with moto_s3_server() as endpoint:           # "http://127.0.0.1:<port>"
        ...                                      # any bucket, fake credentials

or request conftest.py's session-wide fixture `s3_endpoint`:

    def test_x(s3_endpoint): ...

Clients need credentials from the environment only; FAKE_AWS_ENV holds fake ones.
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from procs import free_port, serve

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def moto_s3_server(timeout: float = 30.0) -> Iterator[str]:
    """Start `python -m moto.server` on a free port, yield its URL, stop it on exit."""
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", url.rsplit(":", 1)[1]]
    with tempfile.TemporaryDirectory() as logs, serve(cmd, url, Path(logs) / "moto.log", timeout):
        yield url
