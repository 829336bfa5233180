"""Helpers for the fast-engine tests: random small traces and a tiny model/hardware."""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from expertsim.specs.loader import hardware_from_dict, model_from_dict
from expertsim.traces import RoutingTrace


def tiny_model(layers: int, experts: int, k: int, dense_first: int = 0):
    """``layers`` MoE layers (after ``dense_first`` dense ones) x ``experts``, top-``k``;
    12e6-byte experts."""
    return model_from_dict(dict(
        name="tiny", num_layers=layers + dense_first, moe_layers=list(range(dense_first, dense_first + layers)),
        num_experts=experts, top_k=k, d_model=1000, d_ff_expert=2000, num_heads=8, num_kv_heads=8,
        head_dim=125, vocab_size=1000, dense_params=3_000_000, kv_bytes_per_token=1000, dtype="bf16"))


def tiny_hardware(launch_us: float = 0.0, overhead_us: float = 10.0):
    return hardware_from_dict({
        "name": "tiny-gpu",
        "gpu": dict(memory_gb=10.0, hbm_bandwidth_gbps=1000.0, tflops={"bf16": 100.0},
                    compute_efficiency=1.0, memory_efficiency=1.0, launch_overhead_us=launch_us,
                    workspace_gb=1.0),
        "link": dict(kind="test", bandwidth_gbps=12.0, per_copy_overhead_us=overhead_us, copy_engines=1),
        "cpu": dict(tflops=1.0, memory_bandwidth_gbps=100.0, memory_gb=64.0, efficiency=1.0),
    })


def make_trace(requests: list[list[tuple[int, int]]], layers: int, experts: int, k: int, seed: int) -> RoutingTrace:
    """``requests``: per request, its passes as (phase, tokens): a prefill pass of several
    tokens (phase 0) or a decode token (phase 1). Random distinct top-k experts, drawn from a
    skewed distribution so that caches hit."""
    rng = np.random.default_rng(seed)
    cols = {"request": [], "step": [], "position": [], "phase": []}
    for r, passes in enumerate(requests):
        pos = 0
        for step, (phase, ntok) in enumerate(passes):
            for _ in range(ntok if phase == 0 else 1):
                cols["request"].append(2 * r)
                cols["step"].append(step)
                cols["position"].append(pos)
                cols["phase"].append(phase)
                pos += 1
    n = len(cols["request"])
    p = np.arange(experts, 0, -1, dtype=float) ** 1.5
    p /= p.sum()
    ex = np.empty((n, layers, k), dtype=np.int64)
    for t in range(n):
        for layer in range(layers):
            ex[t, layer] = rng.choice(experts, size=k, replace=False, p=p)
    return RoutingTrace(experts=ex, num_experts=experts, metadata={"source": "random-test"},
                        **{name: np.asarray(v) for name, v in cols.items()})


@st.composite
def small_traces(draw, max_layers: int = 3, max_experts: int = 6, max_requests: int = 3):
    layers = draw(st.integers(1, max_layers))
    experts = draw(st.integers(2, max_experts))
    k = draw(st.integers(1, min(3, experts)))
    passes = st.one_of(st.tuples(st.just(0), st.integers(1, 6)), st.tuples(st.just(1), st.just(1)))
    requests = draw(st.lists(st.lists(passes, min_size=1, max_size=8), min_size=1, max_size=max_requests))
    seed = draw(st.integers(0, 2**16))
    return make_trace(requests, layers, experts, k, seed)
