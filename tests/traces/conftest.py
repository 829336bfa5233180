"""Fixtures for the traces tests: the shared real traces (skipped cleanly when absent)."""
from __future__ import annotations


import pytest

from shared_traces import load_shared, shared_trace_path  # noqa: E402


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
