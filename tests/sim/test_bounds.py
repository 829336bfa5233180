"""The bounds: Belady's MIN against brute force, and the simulated time never below
max(compute-only bound, link bound) over many random small configurations."""
from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from simhelpers import synthetic_trace, tiny_hardware, tiny_model

from expertsim.policies import AccessPlan, CacheConfig, make_policy
from expertsim.sim import SimOptions, Simulation
from expertsim.sim.bounds import belady_misses


def brute_force_min_copies(sets: tuple[frozenset, ...], slots: int) -> int:
    """The model of bounds.py by exhaustive search: at each step the set S is needed, |S - C| are
    copied, and the next cache is any ``slots`` of C + S."""
    @lru_cache(maxsize=None)
    def best(i: int, cache: frozenset) -> int:
        if i == len(sets):
            return 0
        union = cache | sets[i]
        cost = len(sets[i] - cache)
        keep = min(slots, len(union))
        return cost + min(best(i + 1, frozenset(c)) for c in itertools.combinations(sorted(union), keep))

    return best(0, frozenset())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sets(st.integers(0, 5), min_size=1, max_size=3), min_size=1, max_size=9), st.integers(1, 4))
def test_belady_matches_brute_force(sets, slots):
    keys = np.concatenate([sorted(x) for x in sets]).astype(np.int64)
    steps = np.concatenate([[i] * len(x) for i, x in enumerate(sets)]).astype(np.int64)
    plan = AccessPlan(keys=keys, num_experts=6)
    expected = brute_force_min_copies(tuple(frozenset(x) for x in sets), slots)
    assert belady_misses(plan, partitions=1, slots=slots, steps=steps) == expected


def test_belady_per_layer_partitions_and_initial_residents():
    # keys of layer 0 (0..3) and layer 1 (4..7), one access per step
    plan = AccessPlan(keys=np.array([0, 4, 1, 5, 0, 4], dtype=np.int64), num_experts=4)
    # 1 slot per layer: 0 copied, 1 copied and dropped at once (never used again), 0 hits
    assert belady_misses(plan, partitions=2, slots=1) == 4
    assert belady_misses(plan, partitions=2, slots=1, initial_residents=[0, 4]) == 2
    # one pool of 1 slot: keep 0 (needed again soonest); 4, 1, 5 copied and dropped; 0 hits; 4 copied
    assert belady_misses(plan, partitions=1, slots=1) == 5
    # sets: layer 0 needs {0, 1} then {0, 1} with 1 slot: 2 copies, then 1 (keep one of them)
    sets = AccessPlan(keys=np.array([0, 1, 0, 1], dtype=np.int64), num_experts=4)
    assert belady_misses(sets, partitions=2, slots=1, steps=np.array([0, 0, 1, 1])) == 3
    assert belady_misses(sets, partitions=2, slots=2, steps=np.array([0, 0, 1, 1])) == 2


def test_belady_lower_bounds_the_belady_eviction_policy_on_a_real_run():
    trace = synthetic_trace(num_requests=3, prompt=3, decode=12, layers=2, experts=8, seed=7)
    model = tiny_model(num_experts=8)
    for name in ("lru", "belady"):
        try:
            policy = make_policy(name)
        except Exception:  # the Belady eviction policy lives in policies/ (another module)
            continue
        r = Simulation(model, tiny_hardware(), policy, CacheConfig(per_layer=3)).run(trace)
        assert r.metrics["belady_misses"] <= r.metrics["misses"]
        if name == "belady":
            # the engine cannot drop a needed expert without using a slot: a few more, never fewer
            assert r.metrics["misses"] <= 1.5 * r.metrics["belady_misses"]


@st.composite
def configs(draw):
    experts = draw(st.integers(2, 6))
    top_k = draw(st.integers(1, min(2, experts)))
    layers = draw(st.integers(1, 3))
    model = tiny_model(num_layers=layers, num_experts=experts, top_k=top_k,
                       d_ff_expert=draw(st.sampled_from([10, 2000, 20000])))
    hw = tiny_hardware(
        gpu={"hbm_bandwidth_gbps": draw(st.sampled_from([100.0, 1000.0, 1e5])),
             "tflops": {"bf16": draw(st.sampled_from([1.0, 100.0, 1e4]))},
             "launch_overhead_us": draw(st.sampled_from([0.0, 5.0]))},
        link={"bandwidth_gbps": draw(st.sampled_from([0.5, 12.0, 400.0])),
              "per_copy_overhead_us": draw(st.sampled_from([0.0, 10.0, 330.0])),
              "copy_engines": draw(st.integers(1, 3)), "pinned": draw(st.booleans())},
    )
    kind = draw(st.sampled_from(["per_layer", "global", "no-cache", "all-on-gpu"]))
    if kind == "per_layer":
        policy, cache = "lru", CacheConfig(per_layer=draw(st.integers(top_k, experts)))
    elif kind == "global":
        policy, cache = "lru", CacheConfig(global_slots=draw(st.integers(top_k, experts * layers)))
    else:
        policy, cache = kind, None
    batch = draw(st.integers(1, 4))
    arrival = draw(st.sampled_from(["closed", "offline", "poisson"]))
    options = SimOptions(batch=batch, arrival=arrival, rate_per_s=2000.0 if arrival == "poisson" else None,
                         seed=draw(st.integers(0, 5)),
                         prefill_chunk_tokens=draw(st.sampled_from([None, 2])),
                         copy_chunk_bytes=draw(st.sampled_from([None, 5_000_000])))
    n = draw(st.integers(1, 4))
    trace = synthetic_trace(num_requests=n, layers=layers, experts=experts, k=top_k,
                            prompts=[draw(st.integers(1, 4)) for _ in range(n)],
                            decodes=[draw(st.integers(0, 5)) for _ in range(n)], seed=draw(st.integers(0, 99)))
    return model, hw, policy, cache, options, trace


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_simulated_time_never_falls_below_the_bounds(config):
    model, hw, policy, cache, options, trace = config
    r = Simulation(model, hw, make_policy(policy), cache, options=options).run(trace)
    m = r.metrics
    total_ns = round(m["total_s"] * 1e9)
    assert total_ns >= m["compute_bound_ns"]
    assert total_ns >= m["link_bound_ns"]
    assert m["belady_misses"] <= m["misses"]
    assert m["bound_s"] == max(m["compute_bound_s"], m["link_bound_s"])
