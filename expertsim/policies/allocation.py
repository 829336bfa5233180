"""Cross-layer slot allocation: moving expert-cache capacity between per-layer partitions."""
from __future__ import annotations

import numpy as np

from expertsim.errors import PolicyError
from expertsim.jit import _njit
from expertsim.policies.base import LayerObservation, LayerOutcome, Parameterised, RunContext


def proportional_slots(total: int, demand: np.ndarray, minimum: int, maximum: int) -> np.ndarray:
    """Split ``total`` slots over layers: ``minimum`` each, the rest in proportion to ``demand``
    (largest remainder; ties to the lower layer), never above ``maximum`` per layer
    (:func:`_proportional_slots`, compiled: the fast engine's kernel calls it too)."""
    n = len(demand)
    if total < minimum * n:
        raise PolicyError(f"{total} slots cannot give {n} layers {minimum} each")
    return _proportional_slots(int(total), np.asarray(demand, dtype=np.int64), int(minimum), int(maximum))


@_njit
def _proportional_slots(total, demand, minimum, maximum):
    """:func:`proportional_slots` (``total`` >= ``minimum`` x layers): rounds of an ideal share of
    the spare slots in proportion to demand + 1e-9 among the layers with room, floored, the
    largest remainders (ties to the lower layer) one more, until nothing is left or nothing moves;
    the weights' sum in numpy's order (:func:`_numpy_sum`)."""
    n = demand.shape[0]
    slots = np.full(n, minimum, dtype=np.int64)
    spare = min(total - minimum * n, (maximum - minimum) * n)
    share = np.zeros(n)
    ideal = np.zeros(n)
    key = np.zeros(n)
    add = np.zeros(n, dtype=np.int64)
    while spare > 0:
        for i in range(n):
            share[i] = np.float64(demand[i]) + 1e-9 if slots[i] < maximum else 0.0
        whole = _numpy_sum(share, 0, n)
        added = 0
        for i in range(n):
            ideal[i] = share[i] / whole * spare
            add[i] = min(np.int64(np.floor(ideal[i])), maximum - slots[i])
            added += add[i]
        left = spare - added
        if left > 0:  # the largest remainders among the layers with room; equal ones by layer
            for i in range(n):
                key[i] = -(ideal[i] - np.floor(ideal[i])) * (1.0 if slots[i] < maximum else 0.0)
            order = np.argsort(key, kind="mergesort")
            for j in range(min(left, n)):
                i = order[j]
                if slots[i] + add[i] < maximum:
                    add[i] += 1
                    added += 1
        if added == 0:
            break
        for i in range(n):
            slots[i] += add[i]
        spare -= added
    return slots


@_njit
def _numpy_sum(a, lo, n):
    """``a[lo:lo + n].sum()`` as numpy adds a contiguous float64 array (pairwise: blocks of up to
    128 summed by :func:`_block_sum`, a longer range split in two halves, the first a multiple of
    8, and the halves' sums added; the same bits, tested). The halving runs on an explicit stack:
    numba's cache does not keep recursive functions safely."""
    if n <= 128:
        return _block_sum(a, lo, n)
    start = np.zeros(64, dtype=np.int64)  # the frames: range, split, state (0 new, 1 left pending, 2 right)
    size = np.zeros(64, dtype=np.int64)
    split = np.zeros(64, dtype=np.int64)
    state = np.zeros(64, dtype=np.int64)
    left = np.zeros(64)
    top, value, back = 0, 0.0, False
    start[0], size[0] = lo, n
    while top >= 0:
        if back:  # a child's sum in value
            if state[top] == 1:
                left[top], state[top], back = value, 2, False
                start[top + 1], size[top + 1], state[top + 1] = start[top] + split[top], size[top] - split[top], 0
                top += 1
            else:
                value = left[top] + value
                top -= 1
            continue
        if size[top] <= 128:
            value, back = _block_sum(a, start[top], size[top]), True
            top -= 1
            continue
        half = size[top] // 2
        split[top], state[top] = half - half % 8, 1
        start[top + 1], size[top + 1], state[top + 1] = start[top], split[top], 0
        top += 1
    return value


@_njit
def _block_sum(a, lo, n):
    """numpy's pairwise sum of at most 128 elements: in order below 8, else eight running sums
    over the multiples of 8, added in pairs, then the rest in order."""
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[lo + i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    while i < n - n % 8:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


class CrossLayerAllocator(Parameterised):
    """ExpertFlow's cross-layer memory coordination (arXiv 2510.26730): with per-layer cache
    partitions, every ``interval`` passes the slots are split over layers in proportion to each
    layer's working set in the last interval (the distinct experts it used; at least
    ``min_slots`` = top-k per layer, at most every expert of a layer); shrinking a layer evicts
    its eviction policy's victims. With one global pool there
    is nothing to move and it does nothing."""

    def __init__(self, interval: int = 16, min_slots: int | None = None):
        if int(interval) < 1:
            raise PolicyError(f"allocation interval must be >= 1 pass, got {interval!r}")
        self.interval = int(interval)
        self.min_slots = min_slots
        self.reallocations = 0

    def params(self) -> dict:
        return {"interval": self.interval, "min_slots": self.min_slots}


    def prepare(self, ctx: RunContext) -> None:
        cache = ctx.cache
        self._cache = cache
        self.active = cache.num_partitions > 1
        self._used = np.zeros((cache.num_layers, cache.num_experts), dtype=bool)
        self._passes = 0
        top_k = ctx.trace.top_k if ctx.trace is not None else 1
        self._min = int(self.min_slots or top_k)
        self.slots = (cache.capacity // max(cache.expert_bytes, 1)).astype(np.int64) if self.active else None

    def on_layer_end(self, obs: LayerObservation, outcome: LayerOutcome) -> None:
        if not self.active:
            return
        self._used[obs.layer, obs.needed] = True
        if obs.layer != self._cache.num_layers - 1:
            return
        self._passes += 1
        if self._passes % self.interval:
            return
        demand = self._used.sum(axis=1)
        target = proportional_slots(int(self.slots.sum()), demand, self._min, self._cache.num_experts)
        cache = self._cache
        for layer in np.argsort(target - self.slots, kind="stable"):  # shrink first, then grow
            if target[layer] != self.slots[layer]:
                cache.set_partition_capacity(int(layer), int(target[layer]) * cache.expert_bytes)
        self.slots = target
        self._used[:] = False
        self.reallocations += 1
