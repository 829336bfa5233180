"""Cross-layer slot allocation: moving expert-cache capacity between per-layer partitions."""
from __future__ import annotations

import numpy as np

from expertsim.errors import PolicyError
from expertsim.policies.base import LayerObservation, LayerOutcome, Parameterised, RunContext


def proportional_slots(total: int, demand: np.ndarray, minimum: int, maximum: int) -> np.ndarray:
    """Split ``total`` slots over layers: ``minimum`` each, the rest in proportion to ``demand``
    (largest remainder; ties to the lower layer), never above ``maximum`` per layer
    (:func:`~expertsim.policies.allocation_kernels.proportional_split`, compiled: the fast
    engine's kernel calls it too; imported here at the first split, so that building a system
    does not load numba)."""
    from expertsim.policies.allocation_kernels import proportional_split

    n = len(demand)
    if total < minimum * n:
        raise PolicyError(f"{total} slots cannot give {n} layers {minimum} each")
    return proportional_split(int(total), np.asarray(demand, dtype=np.int64), int(minimum), int(maximum))


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
