"""Named systems: compositions of eviction, prefetch, scheduling and miss handling."""
from __future__ import annotations

import numpy as np

from expertsim.policies.base import LayerObservation, LayerOutcome, System
from expertsim.policies.cache import CacheConfig
from expertsim.policies.eviction import LRU
from expertsim.policies.registry import register_system


@register_system("no-cache")
class NoCache(System):
    """Every expert use is copied to the GPU and dropped after the layer: the offloading baseline.
    Hit rate 0 by construction; the staging buffer holds top-k experts per layer."""

    description = "copy every expert on every use (staging buffer of top-k per layer)"

    def __init__(self):
        super().__init__(LRU())

    def cache_config(self, model):
        return CacheConfig(per_layer=model.top_k)

    def on_layer_end(self, obs: LayerObservation, outcome: LayerOutcome) -> None:
        cache = obs.cache
        for expert in cache.resident_experts(obs.layer):
            cache.evict(cache.key(obs.layer, expert))


@register_system("all-on-gpu")
class AllOnGpu(System):
    """Every expert resident from the start, no copies: the compute-only bound. It ignores GPU
    capacity (a bound, not a feasible system when the model does not fit)."""

    description = "all experts resident, no copies (bound; ignores GPU capacity)"
    ignores_capacity = True

    def __init__(self):
        super().__init__(LRU())

    def cache_config(self, model):
        return CacheConfig(unlimited=True)

    def initial_residents(self, model) -> np.ndarray:
        return np.arange(model.num_moe_layers * model.num_experts)
