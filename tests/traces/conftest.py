"""Fixtures for the traces tests: the shared real traces (skipped cleanly when absent)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def shared_traces_dir() -> Path:
    env = os.environ.get("EXPERTSIM_SHARED_TRACES")
    return Path(env) if env else (REPO / ".." / "shared" / "traces").resolve()


def shared_trace_path(name: str) -> Path:
    path = shared_traces_dir() / name
    if not path.is_file():
        pytest.skip(f"shared trace {name} not found under {shared_traces_dir()} (set EXPERTSIM_SHARED_TRACES)")
    return path


_CACHE: dict = {}


def load_shared(name: str):
    from expertsim.traces import read_trace

    if name not in _CACHE:
        _CACHE[name] = read_trace(shared_trace_path(name))
    return _CACHE[name]


@pytest.fixture(scope="session")
def shared_path():
    """``shared_path(name)``: the path of a shared trace, or a skip when it is absent."""
    return shared_trace_path


@pytest.fixture(scope="session")
def mixtral_trace():
    return load_shared("mixtral-8x7b-mtbench.dev.parquet")


@pytest.fixture(scope="session")
def llama_trace():
    return load_shared("llama4-maverick-mmlu.dev.parquet")


@pytest.fixture(scope="session")
def deepseek_trace():
    return load_shared("deepseek-v2-lite-puffin.dev.parquet")
