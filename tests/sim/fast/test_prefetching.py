"""The compiled kernel for prefetching systems (expertsim.sim.fast.plans / prefetching): equal to the
SimPy DES on every metric and iteration record, for LRU or FIFO caches of every shape, with every
trace-only prefetcher (pregated at any accuracy, modelled and recorded speculation, the ring,
the learned predictor), copies on a copy stream or on the compute stream (host times), both link
queues, chunked prefill, offline arrivals and a dense first layer."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from fasthelpers import small_traces, tiny_hardware, tiny_model
from test_fast_simulate import assert_same_run

from expertsim.errors import ConfigError
from expertsim.policies import CacheConfig, make_policy
from expertsim.policies.eviction import FIFO, LRU, ActivationPriority, SequenceActivation, StaticHotSet
from expertsim.policies.miss import CpuWhenCheaper, GateThresholdPrecision, SkipMisses
from expertsim.policies.allocation import CrossLayerAllocator
from expertsim.policies.prefetch import (
    ActivationMatrixPrefetch,
    AdaptiveDistance,
    LayerRingPrefetch,
    LearnedPrefetch,
    ModelledSpeculation,
    PregatedPrefetch,
    SpeculativePrefetch,
)
from expertsim.policies.systems import DAOP, ComposedSystem, Fiddler
from expertsim.sim import SimOptions, Simulation
from expertsim.sim.fast import plans
from expertsim.specs.runtime import RuntimeSpec


def _prefetcher(name, distance, accuracy):
    if name == "pregated":
        return PregatedPrefetch(distance, accuracy, seed=3)
    if name == "modelled":
        return ModelledSpeculation(distance, recall=accuracy, seed=5)
    if name == "speculative":
        return SpeculativePrefetch(1)
    if name == "ring":
        return LayerRingPrefetch(distance)
    if name == "adaptive":  # ExpertFlow's: the learned predictor at a distance moved by stalls
        return AdaptiveDistance(LearnedPrefetch(1, train_fraction=0.5, max_distance=3), max_distance=3,
                                calm_layers=3)
    if name == "eam":  # MoE-Infinity's matching (a short history: it is trimmed)
        return ActivationMatrixPrefetch(depth=distance, history=2 + distance)
    return LearnedPrefetch(distance, train_fraction=0.5)


def _miss(spec):
    if spec is None:
        return None
    if spec[0] == "skip":
        return SkipMisses(*spec[1:])
    if spec[0] == "hobbit":  # full / low precision / skipped by cumulative gate weight
        return GateThresholdPrecision(*spec[1:])
    return CpuWhenCheaper(always=spec[1], cache_after_cpu=spec[2])  # the CPU when cheaper, background copies


def _with_speculation(trace, seed):
    """A recorded next-layer guess (spec_d1), a sentinel past the last layer."""
    rng = np.random.default_rng(seed)
    guess = np.roll(trace.experts, -1, axis=1).copy()
    wrong = rng.random(guess.shape) < 0.3
    guess[wrong] = rng.integers(0, trace.num_experts, int(wrong.sum()))
    guess[:, -1, :] = trace.num_experts
    return dataclasses.replace(trace, extras={**trace.extras, "spec_d1": guess.astype(np.int16)})


def _run(model, hw, make, cfg, trace, options, engine):
    return Simulation(model, hw, make(), cfg, options=dataclasses.replace(options, engine=engine)).run(
        dataclasses.replace(trace))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=small_traces(max_layers=4, max_experts=6), kind=st.integers(0, 2), size=st.integers(0, 6),
       eviction=st.sampled_from(["lru", "fifo", "static", "fiddler", "priority", "sequence", "daop"]),
       prefetch=st.sampled_from(["pregated", "modelled", "speculative", "ring", "learned", "eam", "adaptive"]),
       distance=st.integers(1, 2), accuracy=st.sampled_from([1.0, 0.6]), serial=st.booleans(),
       host_us=st.sampled_from([0.0, 3.0, 50.0]), queue=st.sampled_from(["priority", "fifo"]),
       arrival=st.sampled_from(["closed", "offline"]), chunk=st.sampled_from([None, None, 2]),
       dense_first=st.integers(0, 1), bounds=st.booleans(),
       miss=st.sampled_from([None, ("skip", 0.3, True), ("skip", 0.6, False), ("skip", 1.0, True),
                             ("cpu", True, True), ("cpu", False, False), ("cpu", False, True),
                             ("hobbit", 0.6, 0.9), ("hobbit", 0.0, 0.5), ("hobbit", 0.3, 1.0)]),
       weights_seed=st.integers(0, 3),
       order=st.sampled_from(["hits-first", "cache-aware"]), writeback=st.booleans(),
       allocate=st.sampled_from([0, 0, 1, 2]))
def test_random_runs_equal_des(trace, kind, size, eviction, prefetch, distance, accuracy, serial, host_us, queue,
                               arrival, chunk, dense_first, bounds, miss, weights_seed, order, writeback, allocate):
    L, E, k = trace.num_layers, trace.num_experts, trace.top_k
    trace = _with_speculation(trace, size)
    if weights_seed:  # gate weights (the skip rule reads them); seed 0: none (uses weigh 1/k)
        w = np.random.default_rng(weights_seed).random(trace.experts.shape)
        trace = dataclasses.replace(trace, weights=(w / w.sum(axis=2, keepdims=True)).astype(np.float32))
    model = tiny_model(L, E, k, dense_first)
    hardware = tiny_hardware()
    cfg = [CacheConfig(per_layer=min(k + size, E + 1)), CacheConfig(global_slots=min(k + size, L * E + 1)),
           CacheConfig(budget_bytes=(k + size) * model.expert_bytes() + 12345)][kind]
    runtime = RuntimeSpec(name="t", copy_stream="compute" if serial else "copy", host_us_per_layer=2 * host_us,
                          host_us_per_expert=host_us, writeback=writeback)

    def make():
        if eviction == "fiddler":  # its hot set preloaded, misses on the CPU when cheaper
            return Fiddler(profile_fraction=0.5)
        if eviction == "daop":  # every miss on the CPU, the prompt's top experts placed in the background
            return DAOP()
        policy = {"lru": LRU, "fifo": FIFO, "static": lambda: StaticHotSet(profile_fraction=0.5),
                  "priority": ActivationPriority, "sequence": SequenceActivation}[eviction]()
        return ComposedSystem(policy, prefetcher=_prefetcher(prefetch, distance, accuracy), miss=_miss(miss),
                              expert_order=order, allocator=CrossLayerAllocator(allocate) if allocate else None)

    options = SimOptions(arrival=arrival, prefill_chunk_tokens=chunk, bounds=bounds, link_queue=queue, runtime=runtime)
    if allocate and writeback and eviction not in ("fiddler", "daop"):  # allocator evictions' write-backs: the DES
        assert not plans.supports_simulation(make(), cfg, options, model=model, hardware=hardware)
        return
    assert plans.supports_simulation(make(), cfg, options, model=model, hardware=hardware)
    try:
        des = _run(model, hardware, make, cfg, trace, options, "des")
    except ConfigError as exc:
        with pytest.raises(ConfigError) as info:
            _run(model, hardware, make, cfg, trace, options, "fast")
        assert str(info.value) == str(exc)
        return
    plans.COPY_ROWS = [8, 1 << 16][size % 2]  # a tiny copy table is compacted at almost every layer
    try:
        got = _run(model, hardware, make, cfg, trace, options, "fast")
    finally:
        plans.COPY_ROWS = 1 << 16
    assert got.config["engine"] == "fast"
    assert_same_run(des, got)
    assert list(got.columns) == list(des.columns)
    for name in des.columns:
        assert got.columns[name].tolist() == des.columns[name].tolist(), name


def test_which_systems_it_takes():
    options = SimOptions()
    takes = {name for name in ("mixtral-offloading", "pregated-moe", "se-moe", "promoe", "expertflow", "hobbit",
                               "moe-infinity", "cache-moe", "fiddler", "skip-misses", "lru", "daop", "expertflow")
             if plans.supports_simulation(make_policy(name), CacheConfig(per_layer=2), options)}
    # plain LRU too (as the ComposedSystem it acts as), though the dispatch gives it its own cache kernel
    assert takes == {"mixtral-offloading", "pregated-moe", "se-moe", "skip-misses", "promoe", "cache-moe", "fiddler",
                     "hobbit", "moe-infinity", "daop", "expertflow", "lru"}
    assert not plans.supports_simulation(make_policy("se-moe"), CacheConfig(per_layer=2), SimOptions(scope="request"))
    assert not plans.supports_simulation(make_policy("se-moe"), CacheConfig(per_layer=2), SimOptions(batch=2))


@pytest.mark.shared
@pytest.mark.parametrize("system", ["mixtral-offloading", "pregated-moe", "se-moe", "skip-misses", "promoe",
                                    "cache-moe", "fiddler", "hobbit", "moe-infinity", "daop", "expertflow"])
def test_shared_trace_named_systems(mixtral_trace, system):
    """The first two requests of the real Mixtral trace on an A40, each system's own runtime and
    default cache."""
    from expertsim.specs import load_hardware, load_model

    sub = mixtral_trace.head_requests(2)
    model, hardware = load_model("mixtral-8x7b"), load_hardware("a40")
    options = SimOptions(bounds=True)
    des = _run(model, hardware, lambda: make_policy(system), None, sub, options, "des")
    got = _run(model, hardware, lambda: make_policy(system), None, sub, options, "auto")
    assert got.config["engine"] == "fast"
    assert_same_run(des, got)
    for name in des.columns:
        assert got.columns[name].tolist() == des.columns[name].tolist(), name


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=small_traces(max_layers=4, max_experts=6),
       prefetch=st.sampled_from(["pregated", "ring", "modelled", "speculative", "eam", "learned"]),
       distance=st.integers(1, 3), per_layer=st.booleans(), size=st.integers(0, 4),
       accuracy=st.sampled_from([1.0, 0.0, 0.5, 0.9]), seed=st.integers(0, 3))
def test_computed_plans_equal_the_asked_ones(trace, prefetch, distance, per_layer, size, accuracy, seed):
    """The ring's, the pre-gate's (any accuracy: the same seeded draws), the modelled and the
    recorded speculation's, MoE-Infinity's and the learned predictor's requests, computed at
    once, are the ones the prefetcher gives when asked layer by layer."""
    from expertsim.policies import ExpertCache, RunContext
    from expertsim.sim.fast.groups import groups_from_passes
    from expertsim.sim.fast.simulate import _batch1_schedule

    L, E, k = trace.num_layers, trace.num_experts, trace.top_k
    model = tiny_model(L, E, k)
    cfg = CacheConfig(per_layer=k + size) if per_layer else CacheConfig(global_slots=k + size)
    if prefetch == "speculative":
        trace = _with_speculation(trace, seed)
    out = []
    for ask in (False, True):
        system = ComposedSystem(LRU(), prefetcher=_prefetcher(prefetch, distance, accuracy))
        cache = ExpertCache(L, E, model.expert_bytes(), cfg, system.eviction, top_k=k)
        system.prepare(RunContext(model=model, hardware=tiny_hardware(), cost=None, cache=cache, trace=trace))
        sched = _batch1_schedule(trace, None)
        groups = groups_from_passes(trace.experts, np.append(sched.start, trace.num_tokens), E)
        out.append([a.tolist() for a in plans.prefetch_plan(system, trace, sched, groups, cache, ask=ask)])
    assert out[0] == out[1]
    if per_layer and size >= 1 and L > 1 and prefetch != "eam":  # room elsewhere: something is asked
        # (eam asks only for experts the request or its history used: nothing on a first token)
        assert len(out[0][1]) > 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=small_traces(max_layers=5, max_experts=6), lo=st.integers(1, 2), hi=st.integers(2, 4))
def test_adaptive_learned_plans_equal_the_asked_ones(trace, lo, hi):
    """AdaptiveDistance over the learned predictor: the plans of all its distances, made with each
    layer pair predicted once (the initial distance's first, alone), are the plans its
    LearnedPrefetch gives asked at each distance."""
    from expertsim.policies import ExpertCache, RunContext
    from expertsim.sim.fast.groups import groups_from_passes
    from expertsim.sim.fast.simulate import _batch1_schedule

    L, E, k = trace.num_layers, trace.num_experts, trace.top_k
    model = tiny_model(L, E, k)
    system = ComposedSystem(LRU(), prefetcher=AdaptiveDistance(
        LearnedPrefetch(1, train_fraction=0.5, max_distance=hi), min_distance=lo, max_distance=hi))
    cache = ExpertCache(L, E, model.expert_bytes(), CacheConfig(global_slots=k + 1), system.eviction, top_k=k)
    system.prepare(RunContext(model=model, hardware=tiny_hardware(), cost=None, cache=cache, trace=trace))
    sched = _batch1_schedule(trace, None)
    groups = groups_from_passes(trace.experts, np.append(sched.start, trace.num_tokens), E)
    first, first_keys, first_prios, adapt, every_plan = plans._plans(system, trace, sched, groups, cache)
    d0 = int(adapt[0])  # made first, alone: the other distances' starts -1 (absent)
    assert [bool((row == -1).all()) for row in first] == [d != d0 for d in range(lo, hi + 1)]
    starts, keys, prios = every_plan()
    inner, asked, offset = system.prefetcher.inner, [], 0
    for d in range(lo, hi + 1):
        inner.distance = d
        start, key, prio = plans.prefetch_plan(system, trace, sched, groups, cache, ask=True, prefetcher=inner,
                                               trim=False)
        asked.append((start + offset, key, prio))
        offset += len(key)
    assert starts.tolist() == [a[0].tolist() for a in asked]
    assert keys.tolist() == np.concatenate([a[1] for a in asked]).tolist()
    assert prios.tolist() == np.concatenate([a[2] for a in asked]).tolist()
    assert adapt[1:].tolist() == [lo, hi, 32]
    row = d0 - lo  # the first plan is the whole one's row
    a, b = int(starts[row, 0]), int(starts[row, -1])
    assert first[row].tolist() == (starts[row] - a).tolist()
    assert first_keys.tolist() == keys[a:b].tolist() and first_prios.tolist() == prios[a:b].tolist()


@pytest.mark.parametrize("interval", [1, 1000])
def test_an_allocator_short_of_slots_fails_as_in_the_des(interval):
    """CrossLayerAllocator asked for more slots per layer than the partitions hold: the DES
    raises at its first split (after ``interval`` passes), and so does the fast engine, with the
    same message; a run shorter than the interval never splits, in either."""
    from expertsim.errors import PolicyError
    from fasthelpers import make_trace

    trace = make_trace([[(0, 3), (1, 1), (1, 1)], [(0, 2), (1, 1)]], 3, 4, 1, seed=2)
    model, hardware = tiny_model(3, 4, 1), tiny_hardware()

    def make():
        return ComposedSystem(LRU(), allocator=CrossLayerAllocator(interval, min_slots=2))

    cfg, options = CacheConfig(per_layer=1), SimOptions()
    assert plans.supports_simulation(make(), cfg, options, model=model, hardware=hardware)
    if interval > 5:
        assert_same_run(_run(model, hardware, make, cfg, trace, options, "des"),
                        _run(model, hardware, make, cfg, trace, options, "fast"))
        return
    with pytest.raises(PolicyError) as des:
        _run(model, hardware, make, cfg, trace, options, "des")
    with pytest.raises(PolicyError) as fast:
        _run(model, hardware, make, cfg, trace, options, "fast")
    assert str(fast.value) == str(des.value) == "3 slots cannot give 3 layers 2 each"
