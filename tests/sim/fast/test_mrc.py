"""One-pass LRU miss-ratio curves equal the per-size replays."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from fasthelpers import small_traces

from expertsim.policies import CacheConfig, make_policy
from expertsim.sim.cache_replay import replay_cache
from expertsim.sim.mrc import lru_mrc


def check_against_replays(trace, partition, engine, every=1, **kwargs):
    curve = lru_mrc(trace, partition=partition, **kwargs)
    for i, size in enumerate(curve.sizes.tolist()):
        if i % every and i != len(curve.sizes) - 1:
            continue
        cfg = CacheConfig(per_layer=size) if partition == "per_layer" else CacheConfig(global_slots=size)
        r = replay_cache(trace, make_policy("lru"), cfg, engine=engine, **kwargs)
        assert curve.hits[i] == r.hits, size
        assert (curve.per_layer_hits[i] == r.per_layer_hits).all(), size
        assert curve.accesses == r.accesses
    return curve


@pytest.mark.shared
@pytest.mark.parametrize("partition", ["per_layer", "global"])
@pytest.mark.parametrize("semantics", ["together", "standard"])
def test_shared_trace_mrc_equals_fast_replays(mixtral_trace, partition, semantics):
    curve = lru_mrc(mixtral_trace, partition=partition, semantics=semantics)
    sizes = curve.sizes.tolist()
    pick = sizes if partition == "per_layer" else sizes[::23] + [sizes[-1]]
    for size in pick:
        i = sizes.index(size)
        cfg = CacheConfig(per_layer=size) if partition == "per_layer" else CacheConfig(global_slots=size)
        r = replay_cache(mixtral_trace, make_policy("lru"), cfg, engine="fast", semantics=semantics)
        assert curve.hits[i] == r.hits and (curve.per_layer_hits[i] == r.per_layer_hits).all()
    if partition == "per_layer" and semantics == "together":
        rate = dict(zip(sizes, curve.hit_rate.tolist()))
        assert [round(rate[k], 5) for k in (2, 4, 6)] == [0.35290, 0.59699, 0.81360]
        # K = E: only cold misses, one per (request, layer, expert) used.
        dec = mixtral_trace.only_phase("decode")
        L, E = dec.num_layers, dec.num_experts
        code = (dec.request[:, None, None] * L + np.arange(L)[None, :, None]) * E + dec.experts
        assert curve.accesses - curve.hits[-1] == len(np.unique(code))
    assert (np.diff(curve.hits) >= 0).all()  # LRU is a stack algorithm: more room never hurts


@pytest.mark.shared
def test_shared_trace_mrc_equals_general_path_on_a_request(mixtral_trace):
    starts = mixtral_trace.request_starts()
    sub = mixtral_trace.select(np.arange(starts[0], starts[1]))  # 88-token prompt, 40 decode tokens
    check_against_replays(sub, "per_layer", "des", every=2, phase="all", scope="request")
    check_against_replays(sub, "global", "des", every=25, phase="decode", scope="global")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=small_traces(), partition=st.sampled_from(["per_layer", "global"]),
       scope=st.sampled_from(["request", "global"]), semantics=st.sampled_from(["together", "standard"]),
       phase=st.sampled_from(["decode", "all"]))
def test_random_mrc_equals_general_path(trace, partition, scope, semantics, phase):
    if phase == "decode" and not (trace.phase == 1).any():
        phase = "all"
    check_against_replays(trace, partition, "des", scope=scope, semantics=semantics, phase=phase)
