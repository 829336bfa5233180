"""Eviction policies: which unpinned expert leaves the GPU cache when room is needed."""
from __future__ import annotations

import numpy as np

from expertsim.policies.base import EvictionPolicy, RunContext
from expertsim.policies.registry import register_eviction


class _KeyedPolicy(EvictionPolicy):
    """Helper base: one int64 score per (layer, expert) key, victim = lowest score (ties: lowest key)."""

    def prepare(self, ctx: RunContext) -> None:
        self.score = np.zeros(ctx.cache.num_layers * ctx.cache.num_experts, dtype=np.int64)

    def reset(self) -> None:
        self.score[:] = 0

    def victim(self, candidates: np.ndarray, tick: int, position: int) -> int:
        return int(candidates[np.argmin(self.score[candidates])])


@register_eviction("lru")
class LRU(_KeyedPolicy):
    """Least recently used (Cache-MoE, mixtral-offloading's per-layer cache)."""

    def on_access(self, key, tick, hit, position):
        self.score[key] = tick

    def on_insert(self, key, tick, position):
        self.score[key] = tick
