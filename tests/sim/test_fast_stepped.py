"""The fast engine for every system (expertsim.sim.fast.stepped): the DES's compute stream without
SimPy. Its results must be the DES's exactly, on every metric and per-iteration record, for every
built-in system, with prefetches in flight (promoted, dropped), CPU experts, streamed experts,
copies on the compute stream, write-backs, both link queues, batching, open arrivals and a cache
per request; also when round costs make copies and computes end at the same nanosecond."""
from __future__ import annotations

import dataclasses
import math
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expertsim.errors import ConfigError, ExpertSimError
from expertsim.policies import CacheConfig, make_policy
from expertsim.policies.registry import system_names
from expertsim.sim import SimOptions, Simulation

from simhelpers import synthetic_trace, tiny_hardware, tiny_model

NAMED = sorted(set(system_names()) - {"compose"})
SYSTEMS = tuple(NAMED) + ("lru", "belady", "lfu")


def _result(engine, system, trace, model, hw, cache, **options):
    policy = make_policy(system)
    cache = None if system in ("no-cache", "all-on-gpu") else cache
    result = Simulation(model, hw, policy, cache, options=SimOptions(engine=engine, bounds=False, **options)).run(
        dataclasses.replace(trace))
    metrics = {k: v for k, v in result.metrics.items() if k not in ("wall_s", "engine")}
    columns = {k: v.tolist() for k, v in result.columns.items()}
    return metrics, columns, result.config["engine"]


def _equal(a, b):
    ma, mb = a[0], b[0]
    assert ma.keys() == mb.keys()
    for k in ma:
        x, y = ma[k], mb[k]
        if isinstance(x, float) and math.isnan(x):
            assert isinstance(y, float) and math.isnan(y), k
        else:
            assert x == y, (k, x, y)
    assert a[1] == b[1]


def _assert_fast_equals_des(system, trace, model, hw, cache, options):
    try:
        reference = _result("des", system, trace, model, hw, cache, **options)
    except ExpertSimError as exc:  # a size or an arrival mode the system refuses: both alike
        with pytest.raises(type(exc), match=re.escape(str(exc))):
            _result("fast", system, trace, model, hw, cache, **options)
        return
    fast = _result("fast", system, trace, model, hw, cache, **options)
    assert fast[2] == "fast"
    _equal(fast, reference)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(system=st.sampled_from(SYSTEMS), seed=st.integers(0, 10_000), requests=st.integers(1, 3),
       prompt=st.integers(1, 4), decode=st.integers(1, 8), layers=st.integers(2, 6), experts=st.integers(4, 8),
       slots=st.integers(1, 3),
       queue=st.sampled_from(["priority", "fifo"]), runtime=st.sampled_from([None, "default", "cache-moe", "daop"]),
       batch=st.integers(1, 3), rate=st.sampled_from([None, 5.0, 200.0]), round_costs=st.booleans(),
       per_request=st.booleans())
def test_equal_to_the_des(system, seed, requests, prompt, decode, layers, experts, slots, queue, runtime, batch, rate,
                          round_costs, per_request):
    trace = synthetic_trace(num_requests=requests, prompt=prompt, decode=decode, layers=layers, experts=experts,
                            seed=seed)
    hw = tiny_hardware()
    if round_costs:  # round numbers everywhere: computes and copies often end at the same ns
        hw = tiny_hardware(link={"bandwidth_gbps": 6.0, "per_copy_overhead_us": 0.0},
                           gpu={"hbm_bandwidth_gbps": 12_000.0})
    model = tiny_model(num_layers=layers, num_experts=experts)
    options = dict(link_queue=queue, runtime=runtime, batch=batch,
                   scope="request" if per_request and batch == 1 else "global")
    if rate is not None:
        options.update(arrival="poisson", rate_per_s=rate, seed=seed)
    _assert_fast_equals_des(system, trace, model, hw, CacheConfig(per_layer=slots), options)


# Four layers of eight experts with three slots each and a link much slower than compute: queued
# prefetches are promoted when needed and dropped when evicted (both happen on this trace).
_OPTIONS = [dict(), dict(link_queue="fifo"), dict(runtime="cache-moe"), dict(runtime="daop"),
            dict(batch=2, arrival="poisson", rate_per_s=50.0), dict(scope="request")]


@pytest.mark.parametrize("options", _OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
@pytest.mark.parametrize("system", SYSTEMS)
def test_every_system_equal_to_the_des(system, options):
    trace = synthetic_trace(num_requests=2, prompt=3, decode=8, layers=4, experts=8, seed=1)
    model, hw, cache = tiny_model(num_layers=4, num_experts=8), tiny_hardware(), CacheConfig(per_layer=3)
    _assert_fast_equals_des(system, trace, model, hw, cache, options)


@pytest.mark.parametrize("system", NAMED)
def test_named_systems_on_a_shared_trace(system):
    """Every named system on its own runtime and default cache, first request of the shared
    Mixtral trace (skipped when the shared traces are absent)."""
    from shared_traces import load_shared

    from expertsim.specs import load_hardware, load_model

    trace = load_shared("mixtral-8x7b-mtbench.dev.parquet").head_requests(1)
    model, hw = load_model("mixtral-8x7b"), load_hardware("a40")
    fast = _result("fast", system, trace, model, hw, None)
    assert fast[2] == "fast"
    _equal(fast, _result("des", system, trace, model, hw, None))


def test_auto_runs_builtin_systems_fast_and_plugins_on_the_des():
    from expertsim.policies import System
    from expertsim.policies.eviction import LRU

    class Mine(System):
        def on_layer(self, obs):
            return super().on_layer(obs)

    trace = synthetic_trace(num_requests=1, prompt=2, decode=3, layers=2, experts=4, seed=0)
    run = lambda system, engine: Simulation(tiny_model(), tiny_hardware(), system, CacheConfig(per_layer=2),  # noqa: E731
                                            options=SimOptions(engine=engine, bounds=False)).run(trace)
    assert run(make_policy("pregated-moe"), "auto").config["engine"] == "fast"
    assert run(Mine(LRU()), "auto").config["engine"] == "des"
    assert run(Mine(LRU()), "fast").config["engine"] == "fast"


def test_conditions_it_does_not_reproduce_are_refused_or_left_to_the_des():
    trace = synthetic_trace(num_requests=1, prompt=2, decode=3, layers=2, experts=4, seed=0)
    hw = tiny_hardware(link={"copy_engines": 2})
    sim = lambda engine, **o: Simulation(tiny_model(), hw, make_policy("pregated-moe"), CacheConfig(per_layer=2),  # noqa: E731
                                         options=SimOptions(engine=engine, bounds=False, **o))
    assert sim("auto").run(trace).config["engine"] == "des"
    with pytest.raises(ConfigError, match="one copy engine"):
        sim("fast").run(trace)
    with pytest.raises(ConfigError, match="one copy engine"):
        Simulation(tiny_model(), tiny_hardware(), make_policy("pregated-moe"), CacheConfig(per_layer=2),
                   options=SimOptions(engine="fast", bounds=False, timeline=True)).run(trace)


@pytest.mark.parametrize("system", ["lru", "pregated-moe", "se-moe", "cache-moe", "moe-infinity", "ktransformers"])
def test_auto_with_a_timeline_window_runs_fast_and_takes_the_window_from_the_des(system):
    """compare's report asks for a timeline of a few iterations: --engine auto runs the fast
    engine for the metrics and the DES only up to the window's end for the timeline; both equal
    a full DES run's."""
    trace = synthetic_trace(num_requests=3, prompt=3, decode=6, layers=4, experts=8, seed=2)
    model, hw, cache = tiny_model(num_layers=4, num_experts=8), tiny_hardware(), CacheConfig(per_layer=3)
    options = dict(timeline=True, timeline_iterations=(2, 6), bounds=False)
    cache = None if system == "ktransformers" else cache

    def run(engine):
        return Simulation(model, hw, make_policy(system), cache, options=SimOptions(engine=engine, **options)).run(
            dataclasses.replace(trace))

    auto, des = run("auto"), run("des")
    assert auto.config["engine"] == "fast" and des.config["engine"] == "des"
    drop = ("wall_s",)
    assert {k: v for k, v in auto.metrics.items() if k not in drop} == \
        {k: v for k, v in des.metrics.items() if k not in drop}
    assert auto.timeline.rows == des.timeline.rows and len(des.timeline.rows) > 0
    assert any("timeline: iterations 2..5 from the DES" in a for a in auto.assumptions)
