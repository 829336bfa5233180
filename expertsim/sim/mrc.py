"""LRU miss-ratio curves in one pass: the hit rate at every cache size, per layer and in total.

LRU is a stack algorithm: the cache of K entries always holds the K most recently used keys of
its partition. For the cache replay's per-token passes this holds for the ``together`` semantics
too (see :mod:`expertsim.policies.serve`): a token's needed experts are looked up in ascending id
order, so their recency follows that order, and with K >= top-k no needed expert is released
mid-layer. An access therefore hits in a cache of K entries exactly when its *stack distance*
(how many distinct keys of its partition were used more recently, as of the start of its token's
layer) is below K. One pass computes every distance; the curve is their cumulative histogram.

``partition="per_layer"``: K slots per MoE layer (sizes top-k .. experts), the distances counted
within a layer. ``partition="global"``: one pool of K slots over all layers (sizes top-k ..
layers x experts). ``semantics="standard"`` replays the flattened stream (each access alone,
sizes from 1), as :func:`expertsim.sim.cache_replay.replay_cache` does. Results equal the
per-size replays exactly (tests/sim/fast/test_mrc.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from expertsim.errors import ConfigError
from expertsim.sim.fast.groups import AccessGroups, _resets, groups_from_passes
from expertsim.sim.fast.jit import _njit
from expertsim.sim.fast.lru import _append, _clear_list, _unlink


@_njit
def _distance_kernel(keys, gstart, gpart, greset, num_keys, num_parts):
    """Stack distance of every access (-1 for a cold miss), measured at its group's start."""
    n_nodes = num_keys + num_parts
    nxt = np.empty(n_nodes, dtype=np.int64)
    prv = np.empty(n_nodes, dtype=np.int64)
    for p in range(num_parts):
        nxt[num_keys + p] = num_keys + p
        prv[num_keys + p] = num_keys + p
    present = np.zeros(num_keys, dtype=np.bool_)
    dist = np.full(keys.shape[0], -1, dtype=np.int64)
    for g in range(gpart.shape[0]):
        if greset[g]:
            for p in range(num_parts):
                _clear_list(nxt, prv, present, num_keys + p)
        s = num_keys + gpart[g]
        a = gstart[g]
        b = gstart[g + 1]
        for i in range(a, b):  # distances against the state at the group's start
            key = keys[i]
            if present[key]:
                d = 0
                node = prv[s]  # most recent first
                while node != key:
                    d += 1
                    node = prv[node]
                dist[i] = d
        for i in range(a, b):  # then the group's keys become the most recent, ascending
            key = keys[i]
            if present[key]:
                _unlink(nxt, prv, present, key)
            present[key] = True
            _append(nxt, prv, s, key)
    return dist


@dataclass
class MissRatioCurve:
    """Hits at every cache size. ``sizes[i]`` entries (per layer, or in the global pool) give
    ``hits[i]`` hits in total and ``per_layer_hits[i, l]`` at MoE layer l."""

    partition: str
    sizes: np.ndarray
    hits: np.ndarray
    per_layer_hits: np.ndarray
    accesses: int
    per_layer_accesses: np.ndarray
    wall_s: float

    @property
    def hit_rate(self) -> np.ndarray:
        return self.hits / self.accesses if self.accesses else np.full(len(self.sizes), np.nan)

    @property
    def miss_ratio(self) -> np.ndarray:
        return 1.0 - self.hit_rate

    @property
    def per_layer_hit_rate(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.per_layer_hits / self.per_layer_accesses[None, :]

    def rows(self) -> list[dict]:
        return [{"size": int(s), "hit_rate": float(r), "hits": int(h), "misses": int(self.accesses - h)}
                for s, r, h in zip(self.sizes, self.hit_rate, self.hits)]

    def to_dict(self) -> dict:
        return {"partition": self.partition, "sizes": self.sizes.tolist(),
                "hit_rate": self.hit_rate.tolist(), "hits": self.hits.tolist(),
                "accesses": self.accesses, "per_layer_hit_rate": self.per_layer_hit_rate.tolist(),
                "wall_s": self.wall_s}


def stack_distances(trace, *, partition: str = "per_layer", phase: str = "decode",
                    scope: str = "request", semantics: str = "together", num_experts: int | None = None):
    """(distances, layer of each access, AccessGroups) for the cache replay's access order."""
    if partition not in ("per_layer", "global"):
        raise ConfigError(f"partition must be 'per_layer' or 'global', got {partition!r}")
    from expertsim.sim.replay_setup import replay_view

    view = replay_view(trace, phase=phase, scope=scope, semantics=semantics)
    E = int(num_experts or view.num_experts)
    n, L, k = view.experts.shape
    if semantics == "standard":
        srt = np.sort(view.experts, axis=2).astype(np.int64)
        layer_of = np.broadcast_to(np.arange(L, dtype=np.int64)[None, :, None], srt.shape)
        keys = (layer_of * E + srt).ravel()
        groups = AccessGroups(keys=keys, tokens=np.ones(len(keys), dtype=np.int64),
                              start=np.arange(len(keys) + 1, dtype=np.int64),
                              layer=np.ascontiguousarray(layer_of).ravel(),
                              pass_index=np.repeat(np.arange(n, dtype=np.int64), L * k))
    else:
        groups = groups_from_passes(view.experts, np.arange(n + 1, dtype=np.int64), E)
    reset = _resets(view.request[groups.pass_index], scope)
    per_layer = partition == "per_layer"
    gpart = groups.layer if per_layer else np.zeros(groups.num_groups, dtype=np.int64)
    dist = _distance_kernel(groups.keys, groups.start, gpart, reset, L * E, L if per_layer else 1)
    return dist, groups.keys // E, groups


def lru_mrc(trace, *, partition: str = "per_layer", phase: str = "decode", scope: str = "request",
            semantics: str = "together", model=None) -> MissRatioCurve:
    """LRU hit counts at every cache size from one pass (see the module docstring)."""
    t0 = time.perf_counter()
    num_experts = None
    if model is not None:
        view = trace.only_phase(phase)
        view.check_model(model)
        num_experts = model.num_experts
    E = int(num_experts or trace.num_experts)
    L, k = trace.num_layers, trace.top_k
    dist, layer, _ = stack_distances(trace, partition=partition, phase=phase, scope=scope,
                                     semantics=semantics, num_experts=E)
    smallest = 1 if semantics == "standard" else k
    largest = E if partition == "per_layer" else L * E
    sizes = np.arange(smallest, largest + 1, dtype=np.int64)
    warm = dist >= 0
    # hist[l, d]: accesses at layer l with distance d; hits at size K = accesses with d < K.
    width = largest + 1
    hist = np.bincount(layer[warm] * width + dist[warm], minlength=L * width).reshape(L, width)
    cum = np.cumsum(hist, axis=1)  # cum[l, d] = accesses with distance <= d
    per_layer_hits = cum[:, sizes - 1].T.copy()
    per_layer_accesses = np.bincount(layer, minlength=L).astype(np.int64)
    return MissRatioCurve(partition=partition, sizes=sizes, hits=per_layer_hits.sum(axis=1),
                          per_layer_hits=per_layer_hits, accesses=int(len(dist)),
                          per_layer_accesses=per_layer_accesses, wall_s=time.perf_counter() - t0)
