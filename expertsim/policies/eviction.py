"""Eviction policies: which unpinned expert leaves the GPU cache when room is needed.

Every policy works on per-layer partitions (``CacheConfig(per_layer=K)``) and on one global pool
(``global_slots`` / ``budget_bytes``) alike: the cache hands it the unpinned candidates of the
partition that needs room. Ties are broken deterministically (by recency, then by lowest key), so
runs are reproducible bit for bit.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from expertsim.errors import PolicyError
from expertsim.policies.base import EvictionPolicy, LayerObservation, RunContext
from expertsim.policies.registration import register_eviction


def _num_keys(ctx: RunContext) -> int:
    return ctx.cache.num_layers * ctx.cache.num_experts


def _lowest(primary: np.ndarray, candidates: np.ndarray, recency: np.ndarray | None = None) -> int:
    """The candidate with the lowest ``primary`` score; ties go to the least recent, then the
    lowest key (candidates arrive sorted ascending)."""
    if recency is None:
        return int(candidates[np.argmin(primary)])
    order = np.lexsort((recency, primary))
    return int(candidates[order[0]])


def hottest(counts: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` highest ``counts`` (ties: the lowest index), ascending: a static hot
    set (Fiddler's profile, KTransformers' GPU experts by frequency)."""
    order = np.lexsort((np.arange(len(counts)), -np.asarray(counts)))
    return np.sort(order[:max(0, int(n))])


def layer_scores(obs: LayerObservation) -> np.ndarray:
    """Per-expert routing score at ``obs.layer``, averaged over the pass's tokens: the full router
    probabilities when the trace recorded them (``extras["router_probs"]``), else the gate weight
    each expert received (0 for experts no token chose), else 1/k per choice."""
    num_experts = obs.cache.num_experts
    probs = obs.trace.extras.get("router_probs") if obs.trace is not None else None
    if probs is not None and probs.shape[1] > obs.layer and probs.shape[2] == num_experts:
        return probs[obs.tokens, obs.layer].astype(np.float64).mean(axis=0)
    n, k = obs.experts.shape
    weights = obs.weights if obs.weights is not None else np.full((n, k), 1.0 / k)
    out = np.zeros(num_experts, dtype=np.float64)
    np.add.at(out, obs.experts.ravel().astype(np.int64), weights.ravel().astype(np.float64))
    return out / max(n, 1)


def routing_profile(trace, fraction: float = 0.25) -> np.ndarray:
    """Expert use counts ``[layers, experts]`` over the first ``fraction`` of the trace's requests
    (at least one): a profiling run, as Fiddler and kTransformers do offline."""
    if not 0 < fraction <= 1:
        raise PolicyError(f"profile fraction must be in (0, 1], got {fraction!r}")
    starts = trace.request_starts()
    n_req = len(starts) - 1
    take = max(1, int(round(fraction * n_req)))
    end = int(starts[min(take, n_req)])
    counts = np.zeros((trace.num_layers, trace.num_experts), dtype=np.float64)
    block = trace.experts[:end].astype(np.int64)
    layer = np.broadcast_to(np.arange(trace.num_layers)[None, :, None], block.shape)
    np.add.at(counts, (layer.ravel(), block.ravel()), 1.0)
    return counts


def load_hot_set_profile(path: str | Path, num_layers: int, num_experts: int) -> np.ndarray:
    """A profile file: ``.npy`` array or ``.json`` ``{"counts": [[...], ...]}``, shape
    ``[layers, experts]``."""
    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"profile file {str(path)!r} does not exist")
    if path.suffix == ".npy":
        counts = np.load(path)
    else:
        counts = np.asarray(json.loads(path.read_text())["counts"], dtype=np.float64)
    if counts.shape != (num_layers, num_experts):
        raise PolicyError(
            f"profile {str(path)!r} has shape {counts.shape}, expected ({num_layers}, {num_experts}) "
            f"(MoE layers x experts of this model)"
        )
    return counts.astype(np.float64)


class _KeyedPolicy(EvictionPolicy):
    """Helper base: one int64 score per (layer, expert) key, victim = lowest score (ties: lowest key)."""

    def prepare(self, ctx: RunContext) -> None:
        self.score = np.zeros(_num_keys(ctx), dtype=np.int64)

    def reset(self) -> None:
        self.score[:] = 0

    def victim(self, candidates: np.ndarray, tick: int, position: int) -> int:
        return int(candidates[self.score[candidates].argmin()])


@register_eviction("lru")
class LRU(_KeyedPolicy):
    """Least recently used (Cache-MoE, mixtral-offloading's per-layer cache, Eliseev & Mazur
    2023, arXiv 2312.17238)."""

    description = "least recently used"

    def on_access(self, key, tick, hit, position):
        self.score[key] = tick

    def on_insert(self, key, tick, position):
        self.score[key] = tick

    def on_predicted(self, key, tick):
        self.score[key] = max(self.score[key], tick)


@register_eviction("fifo")
class FIFO(_KeyedPolicy):
    """First in, first out: the entry admitted longest ago leaves; hits do not refresh it
    (the classic baseline; libCacheSim's FIFO)."""

    description = "first in, first out (hits do not refresh)"

    def on_insert(self, key, tick, position):
        self.score[key] = tick


@register_eviction("lifo")
class LIFO(_KeyedPolicy):
    """Last in, first out with inactive experts first: Expert Buffering (Huang et al.,
    "Towards MoE Deployment: Mitigating Inefficiencies in Mixture-of-Expert (MoE) Inference",
    arXiv 2303.06182). The most recently admitted expert that the current layer's tokens do not
    use leaves; only when every candidate is active does the most recent active one go."""

    description = "last in, first out, inactive experts first (Expert Buffering)"

    def __init__(self, inactive_first: bool = True):
        self.inactive_first = bool(inactive_first)
        self._active = np.zeros(0, dtype=np.int64)

    def params(self) -> dict:
        return {"inactive_first": self.inactive_first}

    def on_insert(self, key, tick, position):
        self.score[key] = tick

    def on_layer(self, obs: LayerObservation) -> None:
        self._active = obs.layer * obs.cache.num_experts + obs.needed.astype(np.int64)

    def victim(self, candidates, tick, position):
        pool = candidates
        if self.inactive_first and len(self._active):
            inactive = candidates[~np.isin(candidates, self._active)]
            if len(inactive):
                pool = inactive
        return int(pool[self.score[pool].argmax()])


@register_eviction("lfu")
class LFU(EvictionPolicy):
    """Least frequently used, optionally decayed: counts are multiplied by ``decay`` per cache
    tick (one tick per lookup), so 1.0 is plain LFU and 0.999 forgets with a half-life of ~700
    lookups. ``in_cache_only`` forgets an expert's count when it leaves (libCacheSim's LFU);
    otherwise counts persist (perfect LFU). Ties: least recently used, then lowest key."""

    description = "least frequently used, optionally decayed"

    def __init__(self, decay: float = 1.0, in_cache_only: bool = True):
        if not 0 < decay <= 1:
            raise PolicyError(f"lfu decay must be in (0, 1], got {decay!r}")
        self.decay = float(decay)
        self.in_cache_only = bool(in_cache_only)

    def params(self) -> dict:
        return {"decay": self.decay, "in_cache_only": self.in_cache_only}

    def prepare(self, ctx: RunContext) -> None:
        n = _num_keys(ctx)
        self.count = np.zeros(n, dtype=np.float64)
        self.stamp = np.zeros(n, dtype=np.int64)  # tick at which count was last brought up to date
        self.last = np.zeros(n, dtype=np.int64)

    def reset(self) -> None:
        self.count[:] = 0
        self.stamp[:] = 0
        self.last[:] = 0

    def _current(self, keys, tick):
        if self.decay == 1.0:
            return self.count[keys]
        return self.count[keys] * self.decay ** (tick - self.stamp[keys]).astype(np.float64)

    def on_access(self, key, tick, hit, position):
        self.count[key] = self._current(key, tick) + 1.0
        self.stamp[key] = tick
        self.last[key] = tick

    def on_insert(self, key, tick, position):
        self.last[key] = max(self.last[key], tick)

    def on_evict(self, key):
        if self.in_cache_only:
            self.count[key] = 0.0

    def victim(self, candidates, tick, position):
        return _lowest(self._current(candidates, tick), candidates, self.last[candidates])


@register_eviction("random")
class RandomEviction(EvictionPolicy):
    """A uniformly random unpinned expert leaves (seeded: same seed, same run)."""

    description = "uniformly random victim (seeded)"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self._rng = np.random.default_rng(self.seed)

    def params(self) -> dict:
        return {"seed": self.seed}

    def prepare(self, ctx: RunContext) -> None:
        self._rng = np.random.default_rng(self.seed)

    def victim(self, candidates, tick, position):
        return int(candidates[self._rng.integers(len(candidates))])


@register_eviction("static")
class StaticHotSet(EvictionPolicy):
    """A static hot set from an offline profile: Fiddler (Kamahori et al., arXiv 2402.07033) and
    kTransformers keep the experts most used in a profiling run on the GPU. The expert with the
    lowest profile count leaves (ties: least recently used), so the hot set never leaves for a
    colder one. ``profile``: a ``.npy``/``.json`` file of counts ``[layers, experts]``; without
    it, counts over the first ``profile_fraction`` of the run's requests (those requests are
    in-sample)."""

    description = "static hot set from a profile (Fiddler, kTransformers)"

    def __init__(self, profile: str | None = None, profile_fraction: float = 0.25):
        self.profile = profile
        self.profile_fraction = float(profile_fraction)

    def params(self) -> dict:
        return {"profile": self.profile, "profile_fraction": self.profile_fraction}

    def prepare(self, ctx: RunContext) -> None:
        L, E = ctx.cache.num_layers, ctx.cache.num_experts
        if self.profile is not None:
            counts = load_hot_set_profile(self.profile, L, E)
        else:
            counts = np.zeros((L, E))
            prof = routing_profile(ctx.trace, self.profile_fraction)
            counts[:prof.shape[0], :prof.shape[1]] = prof
        self.counts = counts.ravel()
        self.last = np.zeros(L * E, dtype=np.int64)

    def hot_keys(self, n: int) -> np.ndarray:
        """The ``n`` keys with the highest profile counts (ties: lowest key)."""
        return hottest(self.counts, n)

    def on_access(self, key, tick, hit, position):
        self.last[key] = tick

    def on_insert(self, key, tick, position):
        self.last[key] = tick

    def victim(self, candidates, tick, position):
        return _lowest(self.counts[candidates], candidates, self.last[candidates])


@register_eviction("belady")
class Belady(EvictionPolicy):
    """Belady's MIN (1966): the expert whose next use is farthest in the future leaves. An
    oracle: it reads the engine's AccessPlan, so its hit rate is an upper bound for any
    demand-paging policy with the same cache."""

    description = "farthest next use leaves (oracle bound)"

    oracle = True

    def prepare(self, ctx: RunContext) -> None:
        if ctx.plan is None:
            raise PolicyError("belady needs the run's access plan (an engine that builds one)")
        keys = ctx.plan.keys
        self._n = len(keys)
        self._nxt = ctx.plan.next_use()
        order = np.lexsort((np.arange(self._n), keys))
        sorted_keys = keys[order]
        self._positions = order  # positions grouped by key, ascending within a key
        n_keys = _num_keys(ctx)
        self._start = np.searchsorted(sorted_keys, np.arange(n_keys), side="left")
        self._stop = np.searchsorted(sorted_keys, np.arange(n_keys), side="right")
        self.next_of = np.full(n_keys, self._n, dtype=np.int64)
        self._last_access = np.full(n_keys, -2, dtype=np.int64)

    def _next_from(self, key: int, position: int) -> int:
        """First use of ``key`` at or after ``position``."""
        pos = self._positions[self._start[key]:self._stop[key]]
        i = np.searchsorted(pos, max(position, 0), side="left")
        return int(pos[i]) if i < len(pos) else self._n

    def on_access(self, key, tick, hit, position):
        if 0 <= position < self._n:
            self.next_of[key] = self._nxt[position]
            self._last_access[key] = position

    def on_insert(self, key, tick, position):
        if self._last_access[key] != position or position < 0:
            self.next_of[key] = self._next_from(key, position)  # a prefetch: its next lookup

    def victim(self, candidates, tick, position):
        nxt = self.next_of[candidates]
        return int(candidates[nxt.argmax()])


@register_eviction("fmoe")
class FrequencyProbability(EvictionPolicy):
    """fMoE (Yu et al., "fMoE: Fine-Grained Expert Offloading for Large Mixture-of-Experts
    Serving", arXiv 2502.05370): priority = access frequency x router probability. The
    probability is a moving average (weight ``alpha`` on the newest pass) of the router's score
    for the expert at its layer (full router probabilities when the trace has them, else gate
    weights); the frequency decays by ``decay`` per tick. Lowest priority leaves."""

    description = "frequency x router probability (fMoE)"
    uses_gate_weights = True

    def __init__(self, alpha: float = 0.3, decay: float = 1.0):
        if not 0 < alpha <= 1 or not 0 < decay <= 1:
            raise PolicyError(f"fmoe needs 0 < alpha <= 1 and 0 < decay <= 1, got {alpha!r}, {decay!r}")
        self.alpha = float(alpha)
        self.decay = float(decay)

    def params(self) -> dict:
        return {"alpha": self.alpha, "decay": self.decay}

    def prepare(self, ctx: RunContext) -> None:
        n = _num_keys(ctx)
        self._E = ctx.cache.num_experts
        self.freq = LFU(self.decay, in_cache_only=False)
        self.freq.prepare(ctx)
        self.prob = np.zeros(n, dtype=np.float64)

    def reset(self) -> None:
        self.freq.reset()
        self.prob[:] = 0

    def on_access(self, key, tick, hit, position):
        self.freq.on_access(key, tick, hit, position)

    def on_insert(self, key, tick, position):
        self.freq.on_insert(key, tick, position)

    def on_layer(self, obs):
        row = slice(obs.layer * self._E, (obs.layer + 1) * self._E)
        self.prob[row] = (1 - self.alpha) * self.prob[row] + self.alpha * layer_scores(obs)

    def victim(self, candidates, tick, position):
        priority = self.freq._current(candidates, tick) * self.prob[candidates]
        return _lowest(priority, candidates, self.freq.last[candidates])


@register_eviction("hybrimoe")
class ScoreMovingAverage(EvictionPolicy):
    """HybriMoE's score-aware caching (Zhong et al., "HybriMoE: Hybrid CPU-GPU Scheduling and
    Cache Management for Efficient MoE Inference", arXiv 2504.05897): each expert keeps an
    exponential moving average of its routing score (weight ``alpha`` on the newest pass); the
    lowest average leaves (ties: least recently used)."""

    description = "moving average of routing scores (HybriMoE)"
    uses_gate_weights = True

    def __init__(self, alpha: float = 0.3):
        if not 0 < alpha <= 1:
            raise PolicyError(f"hybrimoe alpha must be in (0, 1], got {alpha!r}")
        self.alpha = float(alpha)

    def params(self) -> dict:
        return {"alpha": self.alpha}

    def prepare(self, ctx: RunContext) -> None:
        n = _num_keys(ctx)
        self._E = ctx.cache.num_experts
        self.avg = np.zeros(n, dtype=np.float64)
        self.last = np.zeros(n, dtype=np.int64)

    def reset(self) -> None:
        self.avg[:] = 0
        self.last[:] = 0

    def on_access(self, key, tick, hit, position):
        self.last[key] = tick

    def on_insert(self, key, tick, position):
        self.last[key] = max(self.last[key], tick)

    def on_layer(self, obs):
        row = slice(obs.layer * self._E, (obs.layer + 1) * self._E)
        self.avg[row] = (1 - self.alpha) * self.avg[row] + self.alpha * layer_scores(obs)

    def victim(self, candidates, tick, position):
        return _lowest(self.avg[candidates], candidates, self.last[candidates])


@register_eviction("eam-priority")
class ActivationPriority(EvictionPolicy):
    """MoE-Infinity's cache priority (Xue et al., "MoE-Infinity: Efficient MoE Inference on
    Personal Machines with Sparsity-Aware Expert Cache", arXiv 2401.14361; priority_score in its
    repository): priority = layer proximity x the current request's expert activation matrix
    (row-normalised) x the activation frequency over all requests so far. Proximity is 1 for
    layers at or before the executing one and decays linearly with depth (1 - l/L) after it:
    early layers rank higher, since prefetching hides less of their load. Lowest leaves."""

    description = "activation matrix x frequency x layer proximity (MoE-Infinity)"

    def params(self) -> dict:
        return {}

    def prepare(self, ctx: RunContext) -> None:
        L, E = ctx.cache.num_layers, ctx.cache.num_experts
        self._L, self._E = L, E
        self._cache = ctx.cache
        self.request_eam = np.zeros((L, E), dtype=np.float64)
        self.frequency = np.zeros((L, E), dtype=np.float64)
        self.current_layer = 0
        self.last = np.zeros(L * E, dtype=np.int64)

    def on_request_start(self, request: int) -> None:
        self.request_eam[:] = 0

    def on_access(self, key, tick, hit, position):
        self.last[key] = tick

    def on_insert(self, key, tick, position):
        self.last[key] = max(self.last[key], tick)

    def on_layer(self, obs):
        eam, freq = self.request_eam[obs.layer], self.frequency[obs.layer]
        for e in obs.experts.ravel().tolist():  # np.add.at, one by one
            eam[e] += 1.0
            freq[e] += 1.0
        self.current_layer = obs.layer

    def priorities(self, keys: np.ndarray) -> np.ndarray:
        layer, expert = np.divmod(keys, self._E)
        topo = np.where(layer <= self.current_layer, 1.0, 1.0 - layer / self._L)
        rows = self.request_eam[layer]
        row_sum = rows.sum(axis=1)
        eam = np.where(row_sum > 0, self.request_eam[layer, expert] / np.maximum(row_sum, 1e-12), 1.0 / self._E)
        total = self.frequency.sum()
        freq = self.frequency[layer, expert] / total if total > 0 else np.full(len(keys), 1.0)
        return topo * (eam + 1e-6) * (freq + 1e-6)

    def victim(self, candidates, tick, position):
        """Lowest priority leaves; an expert prefetched for a layer that has not run yet is kept
        while another candidate remains. Its activation-matrix entry for the current request is
        still 0 (the request has not reached that layer), so without this a global pool evicts
        each prefetch with the next admission, before its use (precision 0.03, slower than no
        prefetch); MoE-Infinity keeps prefetched experts until the layer that asked for them runs."""
        prefetched = getattr(self._cache, "prefetched", None)  # an ExpertCache (tests may pass a stand-in)
        if len(candidates) <= 64:  # a handful: the same arithmetic on Python floats
            return self._victim_few(candidates.tolist(), prefetched)
        waiting = np.zeros(len(candidates), dtype=bool) if prefetched is None else \
            prefetched[candidates] & (candidates // self._E > self.current_layer)
        if waiting.any() and not waiting.all():
            candidates = candidates[~waiting]
        return _lowest(self.priorities(candidates), candidates, self.last[candidates])

    def _victim_few(self, keys: list[int], prefetched) -> int:
        """:meth:`victim` element by element: each priority is the float64 arithmetic of
        :meth:`priorities` in the same order (the activation counts and their sums are whole
        numbers, so every sum is exact in any order); ties as :func:`_lowest`."""
        E, L, current = self._E, self._L, self.current_layer
        if prefetched is not None:
            waiting = [bool(prefetched[k]) and k // E > current for k in keys]
            if any(waiting) and not all(waiting):
                keys = [k for k, w in zip(keys, waiting) if not w]
        eam, freq, last = self.request_eam, self.frequency, self.last
        total = freq.sum()
        row_sums: dict[int, float] = {}
        best = None
        for i, key in enumerate(keys):
            layer, expert = divmod(key, E)
            topo = 1.0 if layer <= current else 1.0 - layer / L
            row_sum = row_sums.get(layer)
            if row_sum is None:
                row_sum = row_sums[layer] = eam[layer].sum()
            a = eam[layer, expert] / max(row_sum, 1e-12) if row_sum > 0 else 1.0 / E
            f = freq[layer, expert] / total if total > 0 else 1.0
            rank = (topo * (a + 1e-6) * (f + 1e-6), last[key], i)
            if best is None or rank < best[0]:
                best = (rank, key)
        return best[1]


@register_eviction("sequence-activation")
class SequenceActivation(EvictionPolicy):
    """DAOP's data-aware placement (Zhang et al., "DAOP: Data-Aware Offloading and Predictive
    Pre-Calculation for Efficient MoE Inference", arXiv 2501.10375, Sec. 3): the expert the
    current sequence has routed the fewest tokens to leaves (its prompt's activations decide the
    placement, decode tokens refine it); ties: least recently used, then lowest key. Counts start
    at 0 with each request."""

    description = "fewest tokens of the current sequence routed to it leaves (DAOP)"

    def params(self) -> dict:
        return {}

    def prepare(self, ctx: RunContext) -> None:
        n = _num_keys(ctx)
        self._E = ctx.cache.num_experts
        self.count = np.zeros(n, dtype=np.int64)
        self.last = np.zeros(n, dtype=np.int64)

    def on_request_start(self, request: int) -> None:
        self.count[:] = 0

    def reset(self) -> None:
        self.count[:] = 0
        self.last[:] = 0

    def on_layer(self, obs) -> None:
        keys = obs.layer * self._E + obs.experts.ravel().astype(np.int64)
        np.add.at(self.count, keys, 1)

    def on_access(self, key, tick, hit, position):
        self.last[key] = tick

    def on_insert(self, key, tick, position):
        self.last[key] = max(self.last[key], tick)

    def victim(self, candidates, tick, position):
        return _lowest(self.count[candidates].astype(np.float64), candidates, self.last[candidates])
