"""Policies: eviction, prefetch, token scheduling, miss handling, and named systems.

The contract engines drive is in :mod:`expertsim.policies.base`; the shared cache bookkeeping in
:mod:`expertsim.policies.cache`; names resolve through :mod:`expertsim.policies.registry`.
"""
from expertsim.policies.base import (
    AccessPlan,
    EvictionPolicy,
    LayerDecision,
    LayerObservation,
    LayerOutcome,
    MissAction,
    PrefetchRequest,
    RunContext,
    System,
)
from expertsim.policies.cache import CacheConfig, ExpertCache
from expertsim.policies.registry import (
    eviction_names,
    load_plugin,
    make_eviction,
    make_policy,
    make_system,
    register_eviction,
    register_miss,
    register_prefetch,
    register_scheduler,
    register_system,
    system_names,
)

__all__ = [
    "AccessPlan", "EvictionPolicy", "LayerDecision", "LayerObservation", "LayerOutcome",
    "MissAction", "PrefetchRequest", "RunContext", "System", "CacheConfig", "ExpertCache",
    "eviction_names", "load_plugin", "make_eviction", "make_policy", "make_system",
    "register_eviction", "register_miss", "register_prefetch", "register_scheduler", "register_system",
    "system_names",
]
