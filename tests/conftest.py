"""Shared test fixtures: where the conformance corpus lives."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE = ROOT.parent / "shared" / "conformance"


@pytest.fixture(scope="session")
def conformance() -> Path:
    if not CONFORMANCE.is_dir():
        pytest.fail(f"conformance corpus not found at {CONFORMANCE}")
    return CONFORMANCE
