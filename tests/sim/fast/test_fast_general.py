"""The fast engine's general eviction pass (expertsim.sim.fast.general) equals the SimPy DES on
every metric and every iteration record, for every built-in eviction policy and for eviction-only
plug-ins."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from fasthelpers import small_traces, tiny_hardware, tiny_model
from test_fast_simulate import assert_same_run

from expertsim.errors import ConfigError
from expertsim.policies import CacheConfig, System, make_policy
from expertsim.policies.base import EvictionPolicy
from expertsim.policies.eviction import LFU
from expertsim.policies.registry import eviction_names
from expertsim.sim import SimOptions, Simulation
from expertsim.sim.fast import general as fast_general

EVICTION = eviction_names()


def run(model, hardware, system_factory, cfg, trace, options, engine):
    return Simulation(model, hardware, system_factory(), cfg, options=dataclasses.replace(options, engine=engine)).run(
        dataclasses.replace(trace))


def test_every_eviction_policy_is_covered():
    """The registry's policies all run on the fast engine (a new one must too, or be refused here)."""
    model, hardware = tiny_model(2, 4, 2), tiny_hardware()
    assert {"lru", "fifo", "lfu", "belady", "random", "static", "eam-priority"} <= set(EVICTION)
    for name in EVICTION:
        assert fast_general.supports_simulation(make_policy(name), CacheConfig(per_layer=2), SimOptions(),
                                                model=model, hardware=hardware), name


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=small_traces(max_layers=3, max_experts=6), kind=st.integers(0, 2), size=st.integers(0, 8),
       policy=st.sampled_from(EVICTION), scope=st.sampled_from(["global", "request"]),
       arrival=st.sampled_from(["closed", "offline"]), chunk=st.sampled_from([None, None, 2]),
       dense_first=st.integers(0, 1), launch_us=st.sampled_from([0.0, 3.0]), bounds=st.booleans(),
       weights_seed=st.one_of(st.none(), st.integers(0, 2**16)))
def test_random_runs_equal_des(trace, kind, size, policy, scope, arrival, chunk, dense_first, launch_us, bounds,
                               weights_seed):
    L, E, k = trace.num_layers, trace.num_experts, trace.top_k
    if weights_seed is not None:  # gate weights: the score-aware policies (fmoe, hybrimoe) read them
        w = np.random.default_rng(weights_seed).random(trace.experts.shape)
        trace = dataclasses.replace(trace, weights=(w / w.sum(axis=2, keepdims=True)).astype(np.float32))
    model = tiny_model(L, E, k, dense_first)
    hardware = tiny_hardware(launch_us=launch_us)
    cfg = [CacheConfig(per_layer=min(k + size, E + 1)), CacheConfig(global_slots=min(k + size, L * E + 1)),
           CacheConfig(budget_bytes=(k + size) * model.expert_bytes() + 12345)][kind]
    options = SimOptions(scope=scope, arrival=arrival, prefill_chunk_tokens=chunk, bounds=bounds)
    assert fast_general.supports_simulation(make_policy(policy), cfg, options, model=model, hardware=hardware)
    try:
        des = run(model, hardware, lambda: make_policy(policy), cfg, trace, options, "des")
    except ConfigError as exc:
        with pytest.raises(ConfigError) as info:
            run(model, hardware, lambda: make_policy(policy), cfg, trace, options, "fast")
        assert str(info.value) == str(exc)
        return
    got = run(model, hardware, lambda: make_policy(policy), cfg, trace, options, "fast")
    assert got.config["engine"] == "fast"
    assert_same_run(des, got)


class _HighestKey(EvictionPolicy):
    """A plug-in: the candidate with the highest key leaves (reads no time)."""

    def victim(self, candidates, tick, position):
        return int(candidates[-1])


class _LayerAware(LFU):
    """A plug-in whose on_layer sees the observation (and so could read its time)."""

    def on_layer(self, obs):
        self.seen = obs.now_ns


def test_eviction_only_plugin_runs_fast_and_equals_des():
    from fasthelpers import make_trace

    trace = make_trace([[(0, 4), (1, 1), (1, 1), (1, 1)], [(0, 3), (1, 1), (1, 1)]], 3, 6, 2, seed=5)
    model, hardware = tiny_model(3, 6, 2), tiny_hardware()
    cfg, options = CacheConfig(per_layer=3), SimOptions(scope="global")
    assert fast_general.eviction_kind(System(_HighestKey())) == "plugin"
    des = run(model, hardware, lambda: System(_HighestKey()), cfg, trace, options, "des")
    got = run(model, hardware, lambda: System(_HighestKey()), cfg, trace, options, "auto")
    assert got.config["engine"] == "fast" and des.config["engine"] == "des"
    assert_same_run(des, got)
    assert got.metrics["hit_rate"] != run(model, hardware, lambda: make_policy("lru"), cfg, trace, options,
                                          "fast").metrics["hit_rate"]


def test_plugin_that_reads_observations_stays_on_des():
    from fasthelpers import make_trace

    trace = make_trace([[(0, 3), (1, 1), (1, 1)]], 2, 4, 2, seed=1)
    model, hardware = tiny_model(2, 4, 2), tiny_hardware()
    cfg = CacheConfig(per_layer=2)
    assert fast_general.eviction_kind(System(_LayerAware())) is None
    auto = run(model, hardware, lambda: System(_LayerAware()), cfg, trace, SimOptions(), "auto")
    assert auto.config["engine"] == "des"
    # --engine fast: the stepped engine (the DES's steps without SimPy), whose observations carry
    # the simulated time as the DES's do
    fast = run(model, hardware, lambda: System(_LayerAware()), cfg, trace, SimOptions(), "fast")
    assert fast.config["engine"] == "fast"
    assert_same_run(auto, fast)
    with pytest.raises(ConfigError, match="does not support"):
        fast_general.simulate(model, hardware, System(_LayerAware()), cfg, trace, SimOptions())


@pytest.mark.shared
@pytest.mark.parametrize("policy,cfg", [("lfu", CacheConfig(per_layer=3)), ("belady", CacheConfig(per_layer=3)),
                                        ("eam-priority", CacheConfig(global_slots=100)),
                                        ("static", CacheConfig(global_slots=96)), ("lifo", CacheConfig(per_layer=2))])
def test_shared_trace_mixtral_a40(mixtral_trace, policy, cfg):
    """The first two requests of the real Mixtral trace (prefill passes + decode) on an A40."""
    from expertsim.specs import load_hardware, load_model

    sub = mixtral_trace.head_requests(2)
    options = SimOptions(scope="global", bounds=True)
    model, hardware = load_model("mixtral-8x7b"), load_hardware("a40")
    des = run(model, hardware, lambda: make_policy(policy), cfg, sub, options, "des")
    got = run(model, hardware, lambda: make_policy(policy), cfg, sub, options, "auto")
    assert got.config["engine"] == "fast"
    assert_same_run(des, got)


def test_plain_systems_take_the_compiled_kernels_where_they_apply():
    """A plain System over a static hot set, activation priority or sequence activation runs on
    the prefetching kernel (as the ComposedSystem it acts as); LRU and FIFO on the cache kernels;
    any other eviction policy on the general pass; with request scope (which the kernel does not
    keep) those three fall back to the general pass."""
    from expertsim.sim.engine import _fast_path_of
    from expertsim.sim.fast import plans

    model, hardware = tiny_model(2, 4, 2), tiny_hardware()
    for name, want in [("static", plans.simulate), ("eam-priority", plans.simulate),
                       ("sequence-activation", plans.simulate), ("lru", fast_general.simulate),
                       ("fifo", fast_general.simulate), ("lfu", fast_general.simulate)]:
        sim = Simulation(model, hardware, make_policy(name), CacheConfig(per_layer=2), options=SimOptions())
        assert _fast_path_of(sim, sim.options) is want, name
        assert plans.supports_simulation(make_policy(name), CacheConfig(per_layer=2), SimOptions(scope="request"),
                                         model=model, hardware=hardware) is False
