"""Shared fixtures: where ../shared/traces is (tests that need it skip cleanly when absent)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_traces_dir() -> Path | None:
    env = os.environ.get("EXPERTSIM_SHARED_TRACES")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "traces")
    for path in candidates:
        if path.is_dir() and any(path.glob("*.parquet")):
            return path
    return None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = shared_traces_dir()
    if path is None:
        pytest.skip("../shared/traces is not present (set EXPERTSIM_SHARED_TRACES)")
    return path


@pytest.fixture(scope="session")
def mixtral_trace_path(shared_dir) -> Path:
    return shared_dir / "mixtral-8x7b-mtbench.dev.parquet"


@pytest.fixture(scope="session")
def mixtral_trace(mixtral_trace_path):
    from expertsim.traces import read_trace

    return read_trace(mixtral_trace_path)
