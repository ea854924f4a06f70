"""Fixtures for the jepsen-lite tests (helpers live in jl_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from jl_helpers import CORPUS


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not (CORPUS / "etcd" / "expected.txt").exists():
        pytest.skip("porcupine corpus not available")
    return CORPUS
