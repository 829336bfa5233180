"""Where the read-only shared routing traces are (../shared/traces, or $EXPERTSIM_SHARED_TRACES),
for every test folder; a test that needs one skips cleanly when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_CACHE: dict = {}


def shared_traces_dir() -> Path:
    env = os.environ.get("EXPERTSIM_SHARED_TRACES")
    return Path(env) if env else (REPO / ".." / "shared" / "traces").resolve()


def shared_trace_path(name: str) -> Path:
    path = shared_traces_dir() / name
    if not path.is_file():
        pytest.skip(f"shared trace {name} not found under {shared_traces_dir()} (set EXPERTSIM_SHARED_TRACES)")
    return path


def load_shared(name: str):
    """The trace, read once per test process (tests must not modify it)."""
    from expertsim.traces import read_trace

    if name not in _CACHE:
        _CACHE[name] = read_trace(shared_trace_path(name))
    return _CACHE[name]
