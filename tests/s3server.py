"""A real S3 endpoint for tests: moto's standalone server as a subprocess on 127.0.0.1.

    from s3server import moto_s3_server        # tests/ is on sys.path under pytest

    with moto_s3_server() as endpoint:           # "http://127.0.0.1:<port>"
        ...                                      # any bucket, fake credentials

or request the session-wide fixture by importing it into a test module:

    from s3server import s3_endpoint  # noqa: F401
    def test_x(s3_endpoint): ...

Clients need credentials from the environment only; FAKE_AWS_ENV holds fake ones.
"""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Iterator

import pytest

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP reply means the server is up
    except OSError:
        return False


@contextlib.contextmanager
def moto_s3_server(timeout: float = 30.0) -> Iterator[str]:
    """Start `python -m moto.server` on a free port, yield its URL, stop it on exit."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not _answers(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"moto server on port {port} did not start:\n{log.read().decode(errors='replace')}")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a moto S3 server shared by the whole test session."""
    with moto_s3_server() as url:
        yield url
