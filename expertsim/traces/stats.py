"""Locality statistics of a routing trace: popularity, temporal reuse, LRU hit-rate curves,
cross-layer predictability and working sets.

The LRU curve uses the project's "together" semantics: one cache per MoE layer with K slots, the
cache emptied at each request's start, tokens of one phase only (decode by default); a token's
experts are looked up (in ascending id order) against the cache as it was before the token, then
all of them become resident together, and least-recently-used experts that the token did not use
are evicted until at most K remain. Within a token, experts are touched in ascending id order, so
the higher id counts as the more recent one (the tie-break when the K boundary splits a token's
experts).

Under these semantics the cache with K >= k slots holds exactly the K most recent experts, so
one pass computes every K at once: an expert's *stack distance* is the number of distinct experts
used more recently than it (in the request, at that layer), a lookup hits iff its stack distance
is below max(K, k), and a first use has an infinite distance (``COLD``). With K < k the cache
still keeps the whole previous token, so it behaves like K = k.
"""
from __future__ import annotations

import math

import numpy as np

from expertsim.errors import TraceError
from expertsim.traces.trace import PHASE_NAMES, RoutingTrace

COLD = np.iinfo(np.int32).max  # stack distance of an expert's first use in a request


def _phase_trace(trace: RoutingTrace, phase: str) -> RoutingTrace:
    if phase not in (*PHASE_NAMES, "all"):
        raise TraceError(f"phase must be prefill, decode or all, got {phase!r}")
    sub = trace.only_phase(phase)
    if sub.num_tokens == 0:
        raise TraceError(
            f"trace has no {phase} tokens; pick another phase (e.g. --phase prefill for a "
            f"prefill-only trace: a causal model routes a prompt token as it would in decode)"
        )
    return sub


def _request_grid(request: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(row, column) of every token in a [requests, max_len] grid, requests in trace order."""
    n = len(request)
    change = np.ones(n, dtype=bool)
    change[1:] = request[1:] != request[:-1]
    row = np.cumsum(change) - 1
    starts = np.flatnonzero(change)
    col = np.arange(n) - starts[row]
    return row, col, int(row[-1]) + 1 if n else 0, int(col.max()) + 1 if n else 0


def token_stack_distances(experts: np.ndarray, request: np.ndarray, num_experts: int) -> np.ndarray:
    """Stack distance of every lookup, ``[tokens, layers, k]`` int32 (``COLD`` for first uses).

    ``experts`` are the tokens of one phase in trace order; the history restarts with each
    request. Requests are processed in parallel, one token column at a time, every layer at once.
    """
    n, num_layers, k = experts.shape
    out = np.empty((n, num_layers, k), dtype=np.int32)
    if n == 0:
        return out
    row, col, num_req, max_len = _request_grid(request)
    grid = np.full((num_req, max_len), -1, dtype=np.int64)
    grid[row, col] = np.arange(n)
    # last[r, l, e]: time of e's last use (higher = more recent); -1 = not used yet.
    last = np.full((num_req, num_layers, num_experts), -1, dtype=np.int64)
    order = np.argsort(experts, axis=2, kind="stable")  # ascending ids: later rank = more recent
    rank_of = np.argsort(order, axis=2)
    l_idx = np.arange(num_layers)[None, :]
    for c in range(max_len):
        tok = grid[:, c]
        active = np.flatnonzero(tok >= 0)
        if len(active) < num_req:
            last_a = last[active]
        else:
            last_a = last
        ids = experts[tok[active]].astype(np.int64)  # [a, L, k]
        ra = np.arange(len(active))[:, None, None]
        t_last = last_a[ra, l_idx[:, :, None], ids]  # [a, L, k]
        dist = (last_a[:, :, None, :] > t_last[..., None]).sum(axis=3)
        dist = np.where(t_last < 0, COLD, dist)
        out[tok[active]] = dist
        stamp = (c + 1) * k + rank_of[tok[active]]
        last_a[ra, l_idx[:, :, None], ids] = stamp
        if len(active) < num_req:
            last[active] = last_a
    return out


def lru_hits(trace: RoutingTrace, cache_sizes, *, phase: str = "decode") -> np.ndarray:
    """Hit counts ``[len(cache_sizes), layers]`` of the per-layer LRU cache ("together"
    semantics, see the module docstring) and, as the second value, lookups per layer."""
    sub = _phase_trace(trace, phase)
    dist = token_stack_distances(sub.experts, sub.request, sub.num_experts)
    return _hits_from_distances(dist, cache_sizes, sub.top_k), sub.num_tokens * sub.top_k


def _hits_from_distances(dist: np.ndarray, cache_sizes, k: int) -> np.ndarray:
    sizes = np.asarray(list(cache_sizes), dtype=np.int64)
    if sizes.size and sizes.min() < 1:
        raise TraceError(f"cache sizes must be >= 1 slot, got {int(sizes.min())}")
    num_layers = dist.shape[1]
    finite = np.where(dist == COLD, -1, dist)
    width = int(finite.max()) + 2 if finite.size else 2
    hist = np.stack([np.bincount(finite[:, l].ravel() + 1, minlength=width) for l in range(num_layers)])
    cum = np.cumsum(hist, axis=1)  # cum[l, d+1] = lookups with distance <= d (index 0: cold)
    eff = np.maximum(sizes, k)
    idx = np.minimum(eff, cum.shape[1] - 1)  # distance < K  <=>  index <= K
    return (cum[:, idx] - cum[:, 0][:, None]).T


def lru_hit_curve(trace: RoutingTrace, cache_sizes=None, *, phase: str = "decode",
                  per_layer: bool = False) -> dict:
    """Per-layer LRU hit rate for each cache size K (slots per layer), "together" semantics.

    Returns ``{"cache_sizes": [...], "hit_rate": [...]}`` (over all layers) and, with
    ``per_layer``, ``"hit_rate_per_layer": [[...] per K]``.
    """
    sizes = list(range(1, trace.num_experts + 1)) if cache_sizes is None else [int(s) for s in cache_sizes]
    hits, lookups = lru_hits(trace, sizes, phase=phase)
    result = {"cache_sizes": sizes, "hit_rate": (hits.sum(axis=1) / (lookups * hits.shape[1])).tolist()}
    if per_layer:
        result["hit_rate_per_layer"] = (hits / lookups).tolist()
    return result


def reuse_next_token(trace: RoutingTrace, *, phase: str = "decode", per_layer: bool = False):
    """Sum over consecutive tokens of a request (at one layer) of |S_t & S_t+1| / sum |S_t|,
    S the token's expert set; pairs are taken within one phase's tokens of each request."""
    sub = _phase_trace(trace, phase)
    same = sub.request[1:] == sub.request[:-1]
    a = np.sort(sub.experts[:-1][same], axis=2)
    b = np.sort(sub.experts[1:][same], axis=2)
    if len(a) == 0:
        raise TraceError("no two consecutive tokens of one request in this phase; reuse is undefined")
    # |A & B| for sorted distinct rows: count of a's elements present in b.
    inter = (a[:, :, :, None] == b[:, :, None, :]).any(axis=3).sum(axis=2)  # [pairs, L]
    per = inter.sum(axis=0) / (len(a) * sub.top_k)
    return per.tolist() if per_layer else float(per.mean())


def top1_repeat_rate(trace: RoutingTrace, *, phase: str = "decode") -> list[float]:
    """Per layer: how often a token's first choice equals the previous token's first choice."""
    sub = _phase_trace(trace, phase)
    same = sub.request[1:] == sub.request[:-1]
    eq = sub.experts[1:, :, 0][same] == sub.experts[:-1, :, 0][same]
    return eq.mean(axis=0).tolist() if len(eq) else [float("nan")] * sub.num_layers


def popularity(trace: RoutingTrace, *, phase: str = "decode") -> np.ndarray:
    """Share of lookups per expert, ``[layers, experts]`` (rows sum to 1)."""
    sub = _phase_trace(trace, phase)
    counts = np.stack([np.bincount(sub.experts[:, l].ravel(), minlength=sub.num_experts)
                       for l in range(sub.num_layers)])
    return counts / counts.sum(axis=1, keepdims=True)


def _entropy_bits(p: np.ndarray, axis=-1) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log2(p), 0.0).sum(axis=axis)


def cross_layer_conditional_entropy(trace: RoutingTrace, *, phase: str = "decode") -> list[float]:
    """Per layer pair (l, l+1): H(B | A) in bits, where (A, B) is a uniformly chosen pair of an
    expert of the token at layer l and one at layer l+1 (all k*k pairs of every token). Compare
    with the entropy of layer l+1's popularity: the difference is what layer l predicts."""
    sub = _phase_trace(trace, phase)
    e, n, k = sub.num_experts, sub.num_tokens, sub.top_k
    out = []
    for l in range(sub.num_layers - 1):
        a = np.repeat(sub.experts[:, l].astype(np.int64), k, axis=1).ravel()
        b = np.tile(sub.experts[:, l + 1].astype(np.int64), (1, k)).ravel()
        joint = np.bincount(a * e + b, minlength=e * e).reshape(e, e) / (n * k * k)
        out.append(float(_entropy_bits(joint.ravel()) - _entropy_bits(joint.sum(axis=1))))
    return out


def working_set(trace: RoutingTrace, *, phase: str = "decode") -> np.ndarray:
    """Distinct experts each request used, ``[requests, layers]``."""
    sub = _phase_trace(trace, phase)
    rows = []
    for _, sl in sub.iter_requests():
        ex = sub.experts[sl]
        rows.append([len(np.unique(ex[:, l])) for l in range(sub.num_layers)])
    return np.asarray(rows)


def reuse_distance_histogram(trace: RoutingTrace, *, phase: str = "decode") -> dict:
    """Share of lookups at each stack distance 0..experts-1, plus first uses ("cold")."""
    sub = _phase_trace(trace, phase)
    dist = token_stack_distances(sub.experts, sub.request, sub.num_experts)
    cold = dist == COLD
    hist = np.bincount(dist[~cold].ravel(), minlength=sub.num_experts)[: sub.num_experts]
    total = dist.size
    return {"distance": list(range(sub.num_experts)), "share": (hist / total).tolist(),
            "cold": float(cold.sum() / total)}


def default_cache_sizes(num_experts: int, top_k: int = 1) -> list[int]:
    """Every size from top-k to 16 experts; above, powers of two, quarters of the layer and k,
    2k, 4k. Never below top-k: such a cache cannot hold one token's experts."""
    if num_experts <= 16:
        return list(range(max(top_k, 1), num_experts + 1))
    sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, num_experts // 4, num_experts // 2,
                    3 * num_experts // 4, num_experts, top_k, 2 * top_k, 4 * top_k})
    return [s for s in sizes if max(top_k, 1) <= s <= num_experts]


def trace_stats(trace: RoutingTrace, *, phase: str = "decode", cache_sizes=None) -> dict:
    """Every statistic above in one JSON-friendly dict (per-layer lists, overall summaries)."""
    sub = _phase_trace(trace, phase)
    sizes = default_cache_sizes(sub.num_experts, sub.top_k) if cache_sizes is None else list(cache_sizes)
    pop = popularity(sub, phase="all")
    ent = _entropy_bits(pop, axis=1)
    dist = token_stack_distances(sub.experts, sub.request, sub.num_experts)
    hits = _hits_from_distances(dist, sizes, sub.top_k)
    lookups = sub.num_tokens * sub.top_k
    single = len(np.unique(sub.request)) == sub.num_tokens
    reuse = [float("nan")] * sub.num_layers if single else reuse_next_token(sub, phase="all", per_layer=True)
    ws = working_set(sub, phase="all")
    cold = dist == COLD
    hist = np.bincount(dist[~cold].ravel(), minlength=sub.num_experts)[: sub.num_experts]
    cond = cross_layer_conditional_entropy(sub, phase="all") if sub.num_layers > 1 else []
    return {
        "model": trace.metadata.get("model", "?"),
        "source": trace.metadata.get("source", "?"),
        "phase": phase,
        "tokens": sub.num_tokens,
        "requests": sub.num_requests,
        "layers": sub.num_layers,
        "experts": sub.num_experts,
        "top_k": sub.top_k,
        "reuse_next_token": float(np.mean(reuse)),
        "lru_hit_curve": {"cache_sizes": sizes,
                          "hit_rate": (hits.sum(axis=1) / (lookups * sub.num_layers)).tolist()},
        "reuse_distance": {"share": (hist / dist.size).tolist(), "cold": float(cold.sum() / dist.size)},
        "working_set_mean": float(ws.mean()),
        "per_layer": {
            "max_share": pop.max(axis=1).tolist(),
            "entropy_bits": ent.tolist(),
            "max_entropy_bits": math.log2(sub.num_experts),
            "reuse_next_token": reuse,
            "top1_repeat": top1_repeat_rate(sub, phase="all"),
            "cond_entropy_next_layer_bits": cond + [float("nan")],
            "working_set_mean": ws.mean(axis=0).tolist(),
            "lru_hit_rate": (hits / lookups).tolist(),
        },
    }
