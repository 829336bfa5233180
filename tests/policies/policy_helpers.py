"""Helpers for the policy tests: tiny hand traces and the shared real traces (tests needing the
latter skip cleanly when they are absent)."""
from __future__ import annotations


import numpy as np

from expertsim.traces import RoutingTrace

from shared_traces import load_shared  # noqa: E402,F401  (re-exported)


def make_trace(experts, num_experts: int, *, weights=None, requests=None, phase: int = 1,
               extras: dict | None = None, token_id=None) -> RoutingTrace:
    """A decode trace from ``experts`` [tokens, layers, k] (or [tokens] for one layer, k = 1);
    one request unless ``requests`` gives each token's request."""
    experts = np.asarray(experts)
    if experts.ndim == 1:
        experts = experts[:, None, None]
    n = experts.shape[0]
    request = np.zeros(n, dtype=np.int64) if requests is None else np.asarray(requests)
    position = np.zeros(n, dtype=np.int64)
    for r in np.unique(request):
        idx = np.flatnonzero(request == r)
        position[idx] = np.arange(len(idx))
    return RoutingTrace(experts=experts, request=request, step=position.copy(), position=position,
                        phase=np.full(n, phase), num_experts=num_experts,
                        weights=None if weights is None else np.asarray(weights, dtype=np.float32),
                        extras=extras or {}, token_id=token_id)


def replay_standard(policy, stream, *, slots: int | None = None, per_layer: int | None = None,
                    num_experts: int | None = None):
    """Hits and misses of a classic single-key access stream (one layer, k = 1)."""
    from expertsim.policies import CacheConfig, make_policy
    from expertsim.sim.cache_replay import replay_cache

    stream = np.asarray(stream)
    trace = make_trace(stream, num_experts or int(stream.max()) + 1)
    system = make_policy(policy) if isinstance(policy, str) else policy
    config = CacheConfig(global_slots=slots) if slots is not None else CacheConfig(per_layer=per_layer)
    result = replay_cache(trace, system, config, semantics="standard", phase="all", scope="global")
    return result.hits, result.misses
