"""The DES's compute-stream clock (engine._DesRun._compute): a compute whose end comes before every
other scheduled event is added to the stream's own clock instead of being a SimPy timeout. The
results must be exactly those of one timeout per compute (SKIP_COMPUTES = False), for every
system (prefetches in flight, CPU experts, streamed experts, copies on the compute stream,
write-backs), chunked copies, several copy engines, both link queues, batching and timelines."""
from __future__ import annotations

import re

import pytest
import simpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from simhelpers import synthetic_trace, tiny_hardware, tiny_model

from expertsim.errors import ExpertSimError
from expertsim.policies import CacheConfig, make_policy
from expertsim.sim import SimOptions, Simulation
from expertsim.sim import engine

SYSTEMS = ("lru", "belady", "cache-moe", "daop", "expertflow", "fiddler", "mixtral-offloading",
           "moe-infinity", "no-cache", "pregated-moe", "promoe", "se-moe", "skip-misses", "all-on-gpu",
           "ktransformers")


class _Counter:
    """Counts the SimPy events processed while active."""

    def __init__(self, monkeypatch):
        self.count = 0
        step = simpy.Environment.step

        def counting(env):
            self.count += 1
            return step(env)

        monkeypatch.setattr(simpy.Environment, "step", counting)


def _run(monkeypatch, skip: bool, system: str, trace, hw, cache, **options):
    monkeypatch.setattr(engine._DesRun, "SKIP_COMPUTES", skip)
    counter = _Counter(monkeypatch)
    policy = make_policy(system)
    cache = None if system in ("no-cache", "all-on-gpu") else cache
    experts = int(trace.num_experts)
    result = Simulation(tiny_model(num_layers=3, num_experts=experts), hw, policy, cache,
                        options=SimOptions(engine="des", bounds=False, **options)).run(trace)
    metrics = {k: v for k, v in result.metrics.items() if k != "wall_s"}
    columns = {k: v.tolist() for k, v in result.columns.items()}
    rows = list(result.timeline.rows) if result.timeline is not None else None
    return (metrics, columns, rows), counter.count


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(system=st.sampled_from(SYSTEMS), seed=st.integers(0, 10_000), requests=st.integers(1, 3),
       prompt=st.integers(1, 4), decode=st.integers(1, 8), experts=st.integers(4, 6), slots=st.integers(1, 3),
       chunk=st.sampled_from([None, 3_000_000, 5_000_000]), engines=st.integers(1, 2),
       queue=st.sampled_from(["priority", "fifo"]), runtime=st.sampled_from([None, "cache-moe", "daop"]),
       batch=st.integers(1, 2), fast_compute=st.booleans(), window=st.booleans(), per_request=st.booleans())
def test_skipped_computes_give_the_same_results(monkeypatch, system, seed, requests, prompt, decode, experts,
                                                slots, chunk, engines, queue, runtime, batch, fast_compute,
                                                window, per_request):
    trace = synthetic_trace(num_requests=requests, prompt=prompt, decode=decode, layers=3, experts=experts,
                            seed=seed)
    hw = tiny_hardware(link={"copy_engines": engines})
    if fast_compute:  # round numbers everywhere: computes and copies often end at the same ns
        hw = tiny_hardware(link={"copy_engines": engines, "bandwidth_gbps": 6.0, "per_copy_overhead_us": 0.0},
                           gpu={"hbm_bandwidth_gbps": 12_000.0})
    options = dict(timeline=True, copy_chunk_bytes=chunk, link_queue=queue, runtime=runtime, batch=batch,
                   timeline_iterations=(2, 9) if window else None,
                   scope="request" if per_request and batch == 1 else "global")
    try:
        reference, events_ref = _run(monkeypatch, False, system, trace, hw, CacheConfig(per_layer=slots), **options)
    except ExpertSimError as exc:  # a size the system refuses (a cross-layer allocation's minimum): both alike
        with pytest.raises(type(exc), match=re.escape(str(exc))):
            _run(monkeypatch, True, system, trace, hw, CacheConfig(per_layer=slots), **options)
        return
    skipped, events = _run(monkeypatch, True, system, trace, hw, CacheConfig(per_layer=slots), **options)
    assert skipped == reference
    assert events <= events_ref


def test_computes_are_skipped_when_nothing_else_runs(monkeypatch):
    """All experts on the GPU: no copy ever runs, so every compute of a pass is one clock advance
    and the run processes a handful of SimPy events instead of one per compute."""
    trace = synthetic_trace(num_requests=2, prompt=3, decode=6, layers=3, experts=4, seed=1)
    hw = tiny_hardware()
    reference, events_ref = _run(monkeypatch, False, "all-on-gpu", trace, hw, None, timeline=True)
    skipped, events = _run(monkeypatch, True, "all-on-gpu", trace, hw, None, timeline=True)
    assert skipped == reference
    computes = len([r for r in reference[2] if r[0] == "gpu"])  # dense and expert rows
    assert events_ref >= computes
    assert events <= 4  # the main process's start, its final catch-up timeout, its end, the empty step


def test_hits_between_copies_are_skipped_and_copies_are_not(monkeypatch):
    trace = synthetic_trace(num_requests=2, prompt=2, decode=8, layers=3, experts=4, seed=2)
    hw = tiny_hardware()
    reference, events_ref = _run(monkeypatch, False, "pregated-moe", trace, hw, CacheConfig(per_layer=2))
    skipped, events = _run(monkeypatch, True, "pregated-moe", trace, hw, CacheConfig(per_layer=2))
    assert skipped == reference
    assert reference[0]["prefetch_copies"] > 0 and reference[0]["h2d_copies"] > 0
    assert events < events_ref




def test_simpy_has_the_internals_the_shortcuts_use():
    """The DES's shortcuts read SimPy 4's private queue, clock and event fields; a SimPy without
    them would make runs take the plain DES (engine.simpy_internals_ok), so this fails first."""
    from expertsim.sim.engine import simpy_internals_ok

    assert simpy_internals_ok()
