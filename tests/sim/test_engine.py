"""The DES against limits with known answers: infinite link, zero compute, copy engines, chunked
prefetches, the storage tier, determinism."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from simhelpers import synthetic_trace, tiny_hardware, tiny_model

from expertsim.errors import ConfigError
from expertsim.policies import CacheConfig, LayerDecision, PrefetchRequest, System, make_policy
from expertsim.sim import SimOptions, Simulation

INF = float("inf")
COPY_NS = 1_010_000  # tiny expert: 10 us + 12e6 B / 12 GB/s


def zero_compute(**link):
    return tiny_hardware(gpu={"hbm_bandwidth_gbps": INF, "tflops": {"bf16": INF}, "launch_overhead_us": 0.0},
                         link=link)


def run(hw, policy="lru", cache=CacheConfig(per_layer=2), trace=None, **options):
    trace = trace if trace is not None else synthetic_trace()
    sim = Simulation(tiny_model(), hw, make_policy(policy) if isinstance(policy, str) else policy, cache,
                     options=SimOptions(**{"engine": "des", **options}))  # the reference engine
    return sim.run(trace)


def test_infinite_link_gives_the_compute_only_bound_exactly():
    hw = tiny_hardware(link={"bandwidth_gbps": INF, "per_copy_overhead_us": 0.0})
    for policy, cache in [("lru", CacheConfig(per_layer=2)), ("no-cache", None), ("lru", CacheConfig(global_slots=3))]:
        r = run(hw, policy, cache)
        assert r.metrics["misses"] > 0
        assert r.metrics["total_s"] == r.metrics["compute_bound_s"]
        assert r.metrics["stall_s"] == 0


def test_compute_bound_equals_the_all_on_gpu_run():
    r = run(tiny_hardware(), "all-on-gpu", None)
    assert r.metrics["misses"] == 0
    assert r.metrics["total_s"] == r.metrics["compute_bound_s"]
    assert r.metrics["link_bound_s"] == 0


def test_zero_compute_gives_the_copy_time_of_the_misses():
    trace = synthetic_trace(num_requests=3, prompt=3, decode=6, seed=1)
    for policy, cache in [("lru", CacheConfig(per_layer=2)), ("no-cache", None), ("lru", CacheConfig(per_layer=3))]:
        r = run(zero_compute(), policy, cache, trace=trace)
        m = r.metrics
        assert m["compute_bound_s"] == 0
        assert m["h2d_copies"] == m["misses"] > 0
        assert round(m["total_s"] * 1e9) == m["misses"] * COPY_NS
        # Belady needs no more copies than the policy made; the link bound is their wire time.
        assert m["belady_misses"] <= m["misses"]
        assert round(m["link_bound_s"] * 1e9) == m["belady_misses"] * 1_000_000


def test_two_copy_engines_overlap_one_copys_overhead_with_anothers_bytes():
    # Every pass needs 2 experts per layer (1-token prompts), no cache: 2 copies per layer.
    trace = synthetic_trace(num_requests=2, prompt=1, decode=4, seed=2)
    passes = 2 * 5
    one = run(zero_compute(), "no-cache", None, trace=trace)
    two = run(zero_compute(copy_engines=2), "no-cache", None, trace=trace)
    assert round(one.metrics["total_s"] * 1e9) == passes * 2 * 2 * COPY_NS
    # per layer: both overheads at once (10 us), then the two copies' bytes back to back
    assert round(two.metrics["total_s"] * 1e9) == passes * 2 * (10_000 + 2 * 1_000_000)


class WrongPrefetcher(System):
    """Copy on miss, and at each layer prefetch for the next layer an expert it will not use."""

    name = "wrong-prefetch"

    def __init__(self):
        super().__init__(make_policy("lru").eviction)

    def on_layer(self, obs):
        trace, layer = obs.trace, obs.layer
        if layer + 1 >= trace.num_layers:
            return LayerDecision()
        needed_next = set(np.unique(trace.experts[obs.tokens, layer + 1]).tolist())
        wrong = [e for e in range(trace.num_experts) if e not in needed_next and not obs.cache.contains(layer + 1, e)]
        return LayerDecision(prefetch=[PrefetchRequest(layer + 1, wrong[0])] if wrong else [])


def test_chunked_copies_let_demand_overtake_and_drop_a_wrong_prefetch():
    trace = synthetic_trace(num_requests=1, prompt=1, decode=8, seed=3)
    whole = run(zero_compute(), WrongPrefetcher(), trace=trace, timeline=True)
    chunked = run(zero_compute(), WrongPrefetcher(), trace=trace, timeline=True, copy_chunk_bytes=3_000_000)
    assert whole.metrics["prefetch_copies"] > 0
    assert chunked.metrics["cancelled_prefetches"] > 0
    assert chunked.metrics["total_s"] < whole.metrics["total_s"]
    assert chunked.metrics["h2d_gb"] < whole.metrics["h2d_gb"]
    # some prefetch stopped between chunks (1 to 3 of its 4 chunks copied), and the demand copy
    # that follows started right after that chunk, not after the whole expert
    from collections import Counter

    chunks = Counter((r[2], r[4], r[5]) for r in chunked.timeline.rows if r[1] == "prefetch")
    assert any(1 <= n < 4 for n in chunks.values())
    assert set(Counter((r[2], r[4], r[5]) for r in whole.timeline.rows if r[1] == "prefetch").values()) == {1}
    # the bound still holds
    for r in (whole, chunked):
        assert r.metrics["total_s"] >= r.metrics["link_bound_s"]


def test_a_fifo_link_serves_copies_in_issue_order_and_drops_nothing():
    """link_queue="fifo" is one CUDA copy stream (the real runner): a demand copy cannot overtake
    a queued prefetch and an evicted prefetch still runs; the cache's decisions do not change."""
    trace = synthetic_trace(num_requests=1, prompt=1, decode=8, seed=3)
    prio = run(zero_compute(), WrongPrefetcher(), trace=trace, copy_chunk_bytes=3_000_000)
    fifo = run(zero_compute(), WrongPrefetcher(), trace=trace, copy_chunk_bytes=3_000_000, link_queue="fifo")
    assert prio.metrics["cancelled_prefetches"] > 0 and fifo.metrics["cancelled_prefetches"] == 0
    assert fifo.metrics["h2d_gb"] > prio.metrics["h2d_gb"]
    assert fifo.metrics["total_s"] > prio.metrics["total_s"]
    assert (fifo.metrics["hits"], fifo.metrics["misses"]) == (prio.metrics["hits"], prio.metrics["misses"])
    # without prefetch every copy is a demand copy: the two queues are the same
    lru_prio, lru_fifo = run(zero_compute(), trace=trace), run(zero_compute(), trace=trace, link_queue="fifo")
    assert lru_prio.iterations == lru_fifo.iterations
    with pytest.raises(ConfigError, match="link queue must be 'priority' or 'fifo', got 'lifo'"):
        run(zero_compute(), trace=trace, link_queue="lifo")


def test_storage_tier_reads_experts_that_do_not_fit_in_host_memory():
    trace = synthetic_trace(num_requests=1, prompt=1, decode=4, seed=4)
    # host holds 2 experts of 12 MB (keys 0 and 1); the other 6 live on NVMe
    hw = zero_compute()
    hw_small = dataclasses.replace(hw, cpu=dataclasses.replace(hw.cpu, memory_gb=0.03),
                                   storage=dataclasses.replace(hw.storage, bandwidth_gbps=6.0, latency_us=100.0))
    base = run(hw, "no-cache", None, trace=trace, timeline=True)
    tiered = run(hw_small, "no-cache", None, trace=trace, timeline=True)
    reads = [r for r in tiered.timeline.rows if r[0] == "storage"]
    on_storage = sum(1 for r in base.timeline.rows if r[0] == "link" and r[4] * 4 + r[5] >= 2)
    assert len(reads) == on_storage > 0
    assert all(r[7] - r[6] == 100_000 + 2_000_000 for r in reads)
    assert tiered.metrics["storage_gb"] == pytest.approx(on_storage * 0.012)
    assert tiered.metrics["total_s"] > base.metrics["total_s"]
    no_storage = dataclasses.replace(hw, cpu=dataclasses.replace(hw.cpu, memory_gb=0.03))
    with pytest.raises(ConfigError, match="storage.bandwidth_gbps"):
        run(no_storage, "no-cache", None, trace=trace)


def test_runs_are_deterministic_bit_for_bit():
    trace = synthetic_trace(num_requests=4, prompt=3, decode=5, seed=5)
    a = run(tiny_hardware(), trace=trace, timeline=True, batch=3, arrival="poisson", rate_per_s=500.0)
    b = run(tiny_hardware(), trace=trace, timeline=True, batch=3, arrival="poisson", rate_per_s=500.0)
    assert a.timeline.rows == b.timeline.rows
    drop = {"wall_s"}
    assert {k: v for k, v in a.metrics.items() if k not in drop} == {k: v for k, v in b.metrics.items() if k not in drop}
    assert all(isinstance(r[6], int) and isinstance(r[7], int) for r in a.timeline.rows)


def test_timeline_rows_cover_copies_computes_and_stalls(tmp_path):
    import json

    from expertsim.sim.metrics import write_chrome_trace

    r = run(tiny_hardware(), timeline=True)
    kinds = {(row[0], row[1]) for row in r.timeline.rows}
    assert {("gpu", "dense"), ("gpu", "expert"), ("gpu", "stall"), ("link", "copy")} <= kinds
    copies = [row for row in r.timeline.rows if row[1] == "copy"]
    assert len(copies) == r.metrics["h2d_copies"] and all(row[8] == 12_000_000 for row in copies)
    path = tmp_path / "t.json"
    write_chrome_trace(r.timeline, path)
    assert len(json.loads(path.read_text())["traceEvents"]) == len(r.timeline) + 4  # one name per track


def test_a_calibrated_profile_and_a_link_curve_drive_the_engine(tmp_path):
    import json

    profile = {
        "format": "expertsim-profile", "version": 1, "device": "test", "model": "tiny",
        "copy": {"bytes": [1_000_000, 12_000_000], "ns": [200_000, 2_000_000]},
        "expert": {"tokens": [1, 100], "ns": [30_000, 60_000]},
        "dense": {"tokens": [1, 100], "context": [1, 100], "ns": [[7_000, 7_000], [9_000, 9_000]]},
        "cpu_expert": {"tokens": [1, 2], "ns": [500_000, 900_000]},
    }
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    trace = synthetic_trace(num_requests=1, prompt=1, decode=3, seed=6)
    r = run(tiny_hardware(), "no-cache", None, trace=trace, timeline=True, profile=str(path))
    rows = r.timeline.rows
    assert {row[7] - row[6] for row in rows if row[1] == "copy"} == {2_000_000}
    assert {row[7] - row[6] for row in rows if row[1] == "expert"} == {30_000}
    assert {row[7] - row[6] for row in rows if row[1] == "dense"} == {7_000}
    # a link curve: 12 MB copies at 6 GB/s -> 10 us + 2 ms
    r = run(tiny_hardware(), "no-cache", None, trace=trace, timeline=True,
            link_curve={"bytes": [1e6, 1e8], "gbps": [6.0, 6.0]})
    assert {row[7] - row[6] for row in r.timeline.rows if row[1] == "copy"} == {2_010_000}


def test_a_des_run_reports_progress(monkeypatch):
    """Long DES runs print where they are: tokens done of the trace's, simulated and wall time."""
    from expertsim.sim import engine

    monkeypatch.setattr(engine._DesRun, "PROGRESS_EVERY_S", 0.0)  # a line per iteration
    trace = synthetic_trace()
    lines: list[str] = []
    result = Simulation(tiny_model(), tiny_hardware(), make_policy("lru"), CacheConfig(per_layer=2),
                        options=SimOptions(engine="des")).run(trace, progress=lines.append)
    assert len(lines) == result.metrics["iterations"]
    assert lines[-1].startswith(f"des: {trace.num_tokens:,}/{trace.num_tokens:,} tokens (100%)")
    assert "s simulated" in lines[0] and "s wall" in lines[0]
    monkeypatch.setattr(engine._DesRun, "PROGRESS_EVERY_S", 3600.0)
    quiet: list[str] = []
    Simulation(tiny_model(), tiny_hardware(), make_policy("lru"), CacheConfig(per_layer=2),
               options=SimOptions(engine="des")).run(trace, progress=quiet.append)
    assert quiet == []
