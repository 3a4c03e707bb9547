"""Shared fixtures: golden reference data, and (added below) the session Ray, S3 and MLflow servers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    """Golden data lives beside the repository (``../shared/reference``) unless SYNRAY_REFERENCE says otherwise."""
    env = os.environ.get("SYNRAY_REFERENCE")
    path = Path(env) if env else ROOT.parent / "shared" / "reference"
    if not path.is_dir():
        pytest.fail(f"golden reference data not found at {path}; set SYNRAY_REFERENCE")
    return path


@pytest.fixture(scope="session")
def reference() -> Path:
    return reference_dir()
