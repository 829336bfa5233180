"""Continuous batching, arrivals, per-request latency metrics."""
from __future__ import annotations

import numpy as np
import pytest
from simhelpers import synthetic_trace, tiny_hardware, tiny_model

from expertsim.errors import ConfigError
from expertsim.policies import CacheConfig, System, make_policy
from expertsim.sim import SimOptions, Simulation
from expertsim.sim.batching import ContinuousBatcher, arrival_times_ns, plan_iterations
from expertsim.sim.workload import build_access_plan, iterations_batch1


def test_batch1_closed_loop_is_the_trace_in_order():
    trace = synthetic_trace(num_requests=3, prompt=4, decode=3, seed=0)
    planned = plan_iterations(trace, max_batch=1)
    old = iterations_batch1(trace)
    assert [(i.start, i.stop, i.request, i.phase, i.context_tokens) for i in planned] == \
        [(i.start, i.stop, i.request, i.phase, i.context_tokens) for i in old]
    assert np.array_equal(build_access_plan(trace, planned, 4).keys, build_access_plan(trace, old, 4).keys)
    assert all(i.attention_pairs is None for i in planned)


def test_offline_batch_runs_requests_together_and_frees_their_slots():
    trace = synthetic_trace(num_requests=3, decodes=[2, 4, 1], prompt=2)
    its = plan_iterations(trace, max_batch=2, arrivals_ns=np.zeros(3, dtype=np.int64))
    # iteration 0: both prompts (2 + 2 tokens); then decode steps of requests 0 and 1
    assert its[0].requests == (0, 1) and its[0].num_tokens == 4 and its[0].phase == 0
    assert its[0].context_tokens == 4 and its[0].attention_pairs == 2 * 2 + 2 * 2
    assert its[1].requests == (0, 1) and its[1].phase == 1 and its[1].context_tokens == 3 + 3
    # request 0 finishes after 2 decode steps: request 2 joins (its prefill, with 1's decode)
    assert its[3].requests == (1, 2) and its[3].phase == 0
    assert sum(i.num_tokens for i in its) == trace.num_tokens
    rows = np.concatenate([i.tokens for i in its])
    assert sorted(rows.tolist()) == list(range(trace.num_tokens))


def test_chunked_prefill_splits_a_prompt():
    trace = synthetic_trace(num_requests=1, prompt=5, decode=2)
    its = plan_iterations(trace, max_batch=1, prefill_chunk_tokens=2)
    assert [i.num_tokens for i in its] == [2, 2, 1, 1, 1]
    assert [i.context_tokens for i in its] == [2, 4, 5, 6, 7]


def test_poisson_arrivals_are_seeded_and_spread():
    a = arrival_times_ns(100, "poisson", rate_per_s=10.0, seed=1)
    assert np.array_equal(a, arrival_times_ns(100, "poisson", rate_per_s=10.0, seed=1))
    assert a[0] == 0 and (np.diff(a) >= 0).all()
    assert 5e9 < a[-1] < 15e9  # 99 gaps of 0.1 s on average
    assert arrival_times_ns(3, "closed") is None
    with pytest.raises(ConfigError, match="--rate"):
        arrival_times_ns(3, "poisson", rate_per_s=-1.0)
    with pytest.raises(ConfigError, match="one per request"):
        arrival_times_ns(3, "closed", timestamps_ns=[0, 1])


def test_a_bad_select_batch_is_reported():
    class Greedy(System):
        def select_batch(self, ready, max_batch, now_ns):
            return list(ready) + [99]

    trace = synthetic_trace(num_requests=2)
    batcher = ContinuousBatcher(trace, max_batch=2, select_batch=Greedy().select_batch)
    with pytest.raises(ConfigError, match="select_batch"):
        batcher.next_iteration(0)


def _sim(trace, cache=CacheConfig(per_layer=2), policy="lru", model=None, **options):
    return Simulation(model or tiny_model(), tiny_hardware(), make_policy(policy), cache,
                      options=SimOptions(**options)).run(trace)


def test_per_request_latencies_at_batch1_match_the_passes():
    trace = synthetic_trace(num_requests=2, prompt=3, decode=4, seed=2)
    r = _sim(trace)
    recs = r.iterations
    # TTFT = first pass duration of each request (closed loop); TPOT = mean decode pass
    first = [recs[0], recs[5]]
    assert r.metrics["ttft_ms"] == pytest.approx(np.mean([(x["end_ns"] - x["start_ns"]) / 1e6 for x in first]))
    decode = [x["end_ns"] - x["start_ns"] for x in recs if x["phase"] == 1]
    assert r.metrics["tpot_ms"] == pytest.approx(np.mean(decode) / 1e6)
    assert r.metrics["e2e_ms"] == pytest.approx(np.mean([(recs[4]["end_ns"]) / 1e6, (recs[9]["end_ns"] - recs[5]["start_ns"]) / 1e6]))


def test_poisson_arrivals_idle_the_gpu_and_count_queueing():
    trace = synthetic_trace(num_requests=3, prompt=2, decode=2, seed=3)
    slow = _sim(trace, batch=2, arrival_times_ns=(0, 10**9, 2 * 10**9))
    assert slow.metrics["idle_s"] > 1.9  # the GPU waits for the second and third arrivals
    assert slow.metrics["total_s"] > 2.0
    # TTFT counts from arrival, so it stays small when the GPU is idle
    assert slow.metrics["ttft_ms"] < 100
    offline = _sim(trace, batch=1, arrival="offline")
    assert offline.metrics["queue_ms"] > 0  # requests 1 and 2 wait for request 0
    closed = _sim(trace, batch=1)
    assert closed.metrics["queue_ms"] == 0
    assert offline.metrics["total_s"] == closed.metrics["total_s"]
    assert offline.metrics["ttft_ms"] > closed.metrics["ttft_ms"]


def test_batching_needs_the_union_of_experts_and_raises_throughput():
    trace = synthetic_trace(num_requests=8, prompt=2, decode=10, layers=2, experts=8, seed=4)
    m = tiny_model(num_experts=8)
    one = _sim(trace, cache=CacheConfig(per_layer=4), model=m)
    many = _sim(trace, cache=CacheConfig(per_layer=4), model=m, batch=8, arrival="offline")
    assert many.metrics["mean_batch"] > 4
    assert many.metrics["experts_per_layer_iteration"] > 1.5 * one.metrics["experts_per_layer_iteration"]
    assert many.metrics["tpot_ms"] > one.metrics["tpot_ms"]  # each iteration copies more experts
    assert many.metrics["total_s"] < one.metrics["total_s"]  # but each copy serves several tokens
    assert many.metrics["total_s"] >= max(many.metrics["compute_bound_s"], many.metrics["link_bound_s"])


def test_request_scope_needs_batch1():
    with pytest.raises(ConfigError, match="batch 1"):
        _sim(synthetic_trace(), batch=2, scope="request")
    with pytest.raises(ConfigError, match="--batch"):
        _sim(synthetic_trace(), batch=0)


def test_oracles_need_timing_independent_iterations():
    from expertsim.policies import eviction_names

    if "belady" not in eviction_names():
        pytest.skip("no Belady eviction policy registered")
    trace = synthetic_trace(num_requests=3)
    with pytest.raises(ConfigError, match="oracle"):
        _sim(trace, policy="belady", batch=2, arrival="poisson", rate_per_s=10.0)
    r = _sim(trace, policy="belady", batch=2, arrival="offline")
    assert r.metrics["misses"] >= r.metrics["belady_misses"]
