"""Shared fixtures. Tests that use ../shared/data skip cleanly when it is absent."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# Two cores on CI: keep torch from oversubscribing them when pytest runs a subprocess too.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real data not present at {SHARED_DATA}")
    return SHARED_DATA
