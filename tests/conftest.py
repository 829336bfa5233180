"""Shared fixtures: the shared real traces (tests that need them skip cleanly when absent)."""
from __future__ import annotations

from pathlib import Path

import pytest

from shared_traces import load_shared, shared_trace_path, shared_traces_dir

MIXTRAL = "mixtral-8x7b-mtbench.dev.parquet"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = shared_traces_dir()
    if not path.is_dir() or not any(path.glob("*.parquet")):
        pytest.skip(f"no shared traces under {path} (set EXPERTSIM_SHARED_TRACES)")
    return path


@pytest.fixture(scope="session")
def mixtral_trace_path() -> Path:
    return shared_trace_path(MIXTRAL)


@pytest.fixture(scope="session")
def mixtral_trace():
    return load_shared(MIXTRAL)
