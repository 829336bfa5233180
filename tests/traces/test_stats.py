"""Locality statistics: the stack-distance LRU curve against a direct simulation, and the numbers
pinned on the shared traces."""
from __future__ import annotations

import numpy as np
import pytest

from expertsim.errors import TraceError
from expertsim.traces import RoutingTrace
from expertsim.traces.stats import (
    cross_layer_conditional_entropy,
    lru_hit_curve,
    popularity,
    reuse_distance_histogram,
    reuse_next_token,
    top1_repeat_rate,
    trace_stats,
    working_set,
)


def simulate_lru_together(trace: RoutingTrace, K: int) -> float:
    """Reference: the "together" semantics, simulated literally with an ordered list per layer."""
    hits = lookups = 0
    dec = trace.only_phase("decode")
    for _, sl in dec.iter_requests():
        caches = [[] for _ in range(dec.num_layers)]  # LRU first, MRU last
        for t in range(sl.start, sl.stop):
            for l in range(dec.num_layers):
                cache = caches[l]
                used = sorted(int(e) for e in dec.experts[t, l])
                for e in used:
                    lookups += 1
                    hits += e in cache
                for e in used:  # all become resident together, touched in ascending id order
                    if e in cache:
                        cache.remove(e)
                    cache.append(e)
                while len(cache) > K:
                    victim = next((e for e in cache if e not in used), None)
                    if victim is None:
                        break
                    cache.remove(victim)
    return hits / lookups


def random_trace(seed, n_req=4, length=40, layers=3, experts=6, k=2, sticky=0.6):
    rng = np.random.default_rng(seed)
    rows, req = [], []
    for r in range(n_req):
        prev = None
        for t in range(length):
            tok = []
            for l in range(layers):
                if prev is not None and rng.random() < sticky:
                    cand = list(prev[l])
                    rng.shuffle(cand)
                    keep = cand[: rng.integers(1, k + 1)]
                else:
                    keep = []
                rest = [e for e in rng.permutation(experts) if e not in keep]
                tok.append((keep + rest)[:k])
            rows.append(tok)
            prev = tok
            req.append(r)
    n = len(rows)
    phase = np.ones(n, dtype=np.uint8)
    return RoutingTrace(experts=np.array(rows), request=np.array(req), step=np.arange(n),
                        position=np.arange(n), phase=phase, num_experts=experts)


@pytest.mark.parametrize("seed,k", [(0, 2), (1, 1), (2, 3)])
def test_stack_distance_curve_equals_direct_simulation(seed, k):
    trace = random_trace(seed, k=k)
    curve = lru_hit_curve(trace, range(1, 7))
    for K, got in zip(curve["cache_sizes"], curve["hit_rate"]):
        assert got == pytest.approx(simulate_lru_together(trace, K), abs=1e-12), K


def test_hand_computed_trace():
    # One layer, top-2, one request: {0,1} {1,2} {0,3} {0,1}
    ex = np.array([[[0, 1]], [[2, 1]], [[3, 0]], [[1, 0]]])
    tr = RoutingTrace(experts=ex, request=np.zeros(4), step=np.arange(4), position=np.arange(4),
                      phase=np.ones(4), num_experts=4)
    # K=2 holds the previous token: hits expert 1 at t1, none at t2, expert 0 at t3 -> 2/8.
    assert lru_hit_curve(tr, [2])["hit_rate"][0] == pytest.approx(2 / 8)
    assert lru_hit_curve(tr, [3])["hit_rate"][0] == pytest.approx(simulate_lru_together(tr, 3))
    assert reuse_next_token(tr) == pytest.approx((1 + 0 + 1) / 6)
    assert top1_repeat_rate(tr) == [0.0]
    assert working_set(tr).tolist() == [[4]]
    h = reuse_distance_histogram(tr)
    assert h["cold"] == pytest.approx(4 / 8)


def test_popularity_and_entropy_on_a_deterministic_router():
    # Layer 1 is a function of layer 0: conditional entropy 0; layer 0 uniform over 4 experts.
    e0 = np.tile(np.arange(4), 10)
    ex = np.stack([e0, (e0 + 1) % 4], axis=1)[:, :, None]
    tr = RoutingTrace(experts=ex, request=np.zeros(40), step=np.arange(40), position=np.arange(40),
                      phase=np.ones(40), num_experts=4)
    assert popularity(tr)[0] == pytest.approx([0.25] * 4)
    assert cross_layer_conditional_entropy(tr) == [pytest.approx(0.0, abs=1e-12)]
    st = trace_stats(tr)
    assert st["per_layer"]["entropy_bits"] == pytest.approx([2.0, 2.0])


def test_phase_errors_name_the_fix():
    tr = random_trace(0)
    with pytest.raises(TraceError, match="no prefill tokens"):
        lru_hit_curve(tr, [2], phase="prefill")
    with pytest.raises(TraceError, match="phase must be"):
        reuse_next_token(tr, phase="decoding")
    with pytest.raises(TraceError, match=">= 1 slot"):
        lru_hit_curve(tr, [0])


@pytest.mark.shared
def test_mixtral_pinned_numbers(mixtral_trace):
    assert round(reuse_next_token(mixtral_trace), 4) == 0.3542
    curve = lru_hit_curve(mixtral_trace, [2, 4, 6])
    assert [round(h, 4) for h in curve["hit_rate"]] == [0.3529, 0.5970, 0.8136]


@pytest.mark.shared
def test_llama_and_deepseek_match_their_readme(llama_trace, deepseek_trace):
    assert [round(h, 4) for h in lru_hit_curve(llama_trace, [1, 4, 16])["hit_rate"]] == [0.3273, 0.5452, 0.7415]
    ds = lru_hit_curve(deepseek_trace, [6, 12, 24], phase="prefill")["hit_rate"]
    assert [round(h, 4) for h in ds] == [0.2617, 0.3928, 0.5821]


def test_stats_and_fit_list_no_cache_smaller_than_top_k(tmp_path):
    """A cache of fewer slots than top-k cannot hold one token's experts: no such row."""
    from expertsim.traces.stats import default_cache_sizes, trace_stats
    from expertsim.traces.synth import fit_trace

    trace = random_trace(0, k=2)
    assert trace_stats(trace, phase="all")["lru_hit_curve"]["cache_sizes"] == [2, 3, 4, 5, 6]
    assert fit_trace(trace, phase="decode")["targets"]["lru_hit_curve"]["cache_sizes"] == [2, 3, 4, 5, 6]
    assert min(default_cache_sizes(128, 8)) == 8 and 4 not in default_cache_sizes(128, 8)
