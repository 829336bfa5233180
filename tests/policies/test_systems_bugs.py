"""Regression tests for bugs found in named systems."""
from __future__ import annotations

import pytest

from expertsim.policies import CacheConfig, make_policy
from expertsim.sim import SimOptions, Simulation
from expertsim.specs import load_hardware, load_model


@pytest.mark.shared
def test_moe_infinity_in_one_global_pool_keeps_its_prefetches_until_their_layer(mixtral_trace):
    """Issue 12 item 7: in one byte-budget pool MoE-Infinity's priority (activation matrix of the
    current request x frequency x proximity) scores an expert prefetched for a later layer 0,
    since the request has not reached that layer; the next admission evicted it before its use
    (prefetch precision 0.03, 1.8x slower than its eviction policy alone). Prefetched experts
    now stay until their layer runs."""
    trace = mixtral_trace.max_tokens(300)
    result = Simulation(load_model("mixtral-8x7b"), load_hardware("rtx4090"), make_policy("moe-infinity"),
                        CacheConfig(budget_bytes=int(16e9)), SimOptions(engine="des")).run(trace)
    assert result.metrics["prefetch_precision"] > 0.3
