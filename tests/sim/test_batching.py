"""Batch 16 on the shared Mixtral trace: the union-of-experts effect (on a slice)."""
from __future__ import annotations

import numpy as np
import pytest
from simhelpers import load_shared

from expertsim.policies import CacheConfig, make_policy
from expertsim.sim import SimOptions, Simulation
from expertsim.specs import load_hardware, load_model


@pytest.fixture(scope="module")
def runs():
    trace = load_shared("mixtral-8x7b-mtbench.dev.parquet").head_requests(16)
    trace = trace.select(np.flatnonzero(trace.step <= 8))  # each prompt + 8 decode tokens
    m, h = load_model("mixtral-8x7b"), load_hardware("a100-80gb-pcie")
    out = {}
    for batch in (1, 16):
        out[batch] = Simulation(m, h, make_policy("lru"), CacheConfig(per_layer=4),
                                options=SimOptions(batch=batch, arrival="offline")).run(trace)
    return trace, out


def test_union_of_experts_grows_with_the_batch(runs):
    trace, r = runs
    one, many = r[1].metrics, r[16].metrics
    assert one["requests"] == many["requests"] == 16
    assert one["decode_tokens"] == many["decode_tokens"] == 16 * 8
    # batch 1 decode needs top-2 per layer (a bit more with prefill passes); 16 tokens need most of 8
    assert 2.0 <= one["experts_per_layer_iteration"] < 3.0
    assert many["experts_per_layer_iteration"] > 6.5
    assert many["mean_batch"] == 16
    # a 4-slot cache cannot hold the union: the hit rate falls ...
    assert many["hit_rate_decode"] < one["hit_rate_decode"]
    # ... each iteration copies more, so TPOT rises ...
    assert many["tpot_ms"] > 2 * one["tpot_ms"]
    # ... but each copy serves many tokens: fewer misses per token, higher throughput
    assert many["misses"] < 0.5 * one["misses"]
    assert many["throughput_tokens_per_s"] > 3 * one["throughput_tokens_per_s"]
    for m in (one, many):
        assert m["total_s"] >= max(m["compute_bound_s"], m["link_bound_s"])
