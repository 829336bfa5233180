"""Fixtures for the policy tests (helpers live in policy_helpers.py)."""
from __future__ import annotations

import pytest

from expertsim.traces import RoutingTrace

from policy_helpers import load_shared


@pytest.fixture(scope="session")
def mixtral_trace() -> RoutingTrace:
    return load_shared("mixtral-8x7b-mtbench.dev.parquet")


@pytest.fixture(scope="session")
def mixtral_gates_trace() -> RoutingTrace:
    return load_shared("mixtral-8x7b-humaneval-gsm8k-gates.dev.parquet")
