"""Cache-only replay: a trace's expert accesses through the expert cache, no timing.

Uses the same LayerServer and ExpertCache as the timed engines, so its hit/miss sequence is the
one they see. Two semantics:

- ``together`` (default): per pass and MoE layer, the needed experts are looked up in ascending
  id order and are resident together (see expertsim.policies.serve).
- ``standard``: the trace flattened to one access stream (requests in order, then positions, then
  layers, then expert ids ascending; key = layer x experts + expert) with classic
  evict-on-insert semantics, as classic cache simulators (libCacheSim) replay it.
"""
from __future__ import annotations

import time

import numpy as np

from expertsim.errors import ConfigError
from expertsim.policies import AccessPlan, CacheConfig, ExpertCache, RunContext, System
from expertsim.policies.serve import LayerServer
from expertsim.sim.cost import CostModel
# The result and the checks every cache replay shares (the fast one too): re-exported here.
from expertsim.sim.replay_setup import CacheReplayResult, prepare_replay, replay_view  # noqa: F401
from expertsim.sim.workload import Iteration, build_access_plan, iterations_batch1
from expertsim.specs import HardwareSpec, ModelSpec
from expertsim.traces import RoutingTrace


def replay_cache(trace: RoutingTrace, system: System, cache_config: CacheConfig | None, *,
                 model: ModelSpec | None = None, hardware: HardwareSpec | None = None,
                 phase: str = "decode", scope: str = "request", semantics: str = "together",
                 per_token: bool = True, engine: str = "auto") -> CacheReplayResult:
    """Replay ``trace`` through the cache. ``phase`` keeps decode/prefill/all tokens; ``scope``
    'request' empties the cache at each request's start, 'global' keeps it. With
    ``per_token`` every token is its own pass (the cache replay's definition); otherwise the
    trace's passes (a prefill pass needs the union of its tokens' experts). ``engine``: "des"
    walks the general LayerServer path; "fast" the vectorised replay of built-in policies
    (expertsim.sim.fast), which gives the same counts; "auto" takes fast when it supports the
    policy."""
    if engine not in ("auto", "des", "fast"):
        raise ConfigError(f"--engine must be auto, des or fast, got {engine!r}")
    if engine != "des":
        try:
            from expertsim.sim import fast
        except ImportError:
            fast = None
        if fast is not None and fast.supports_cache_replay(system, cache_config, semantics):
            return fast.replay_cache_fast(trace, system, cache_config, model=model, phase=phase,
                                          scope=scope, semantics=semantics, per_token=per_token)
        if engine == "fast":
            raise ConfigError(
                f"the fast engine does not support policy {system.label!r} with {semantics} semantics; "
                f"use --engine des"
            )
    t0 = time.perf_counter()
    view, num_layers, num_experts, expert_bytes, cache_config = prepare_replay(
        trace, system, cache_config, model=model, phase=phase, scope=scope, semantics=semantics)
    top_k = 1 if semantics == "standard" else view.top_k
    cache = ExpertCache(num_layers, num_experts, expert_bytes, cache_config, system.eviction, top_k=top_k)
    if semantics == "standard":
        # Each access is its own needed set of one expert: classic evict-on-insert.
        n, L, k = view.experts.shape
        experts = np.sort(view.experts, axis=2).reshape(n * L * k, 1, 1)
        flat = RoutingTrace(
            experts=experts, request=np.repeat(view.request, L * k),
            step=np.arange(n * L * k), position=np.repeat(view.position, L * k),
            phase=np.repeat(view.phase, L * k), num_experts=num_experts, metadata=view.metadata)
        layer_of = np.tile(np.repeat(np.arange(L), k), n)
        iterations = [Iteration(i, i, i + 1, int(flat.request[i]), int(flat.phase[i]), 1)
                      for i in range(n * L * k)]
        keys = layer_of.astype(np.int64) * num_experts + experts.ravel().astype(np.int64)
        plan = AccessPlan(keys=keys, num_experts=num_experts)
        layer_index = layer_of
        source = flat
    else:
        if per_token:
            iterations = [Iteration(i, i, i + 1, int(view.request[i]), int(view.phase[i]),
                                    int(view.position[i]) + 1) for i in range(view.num_tokens)]
        else:
            iterations = iterations_batch1(view)
        plan = build_access_plan(view, iterations, num_experts)
        layer_index = None
        source = view
    cost = CostModel(model, hardware) if (model is not None and hardware is not None) else None
    system.prepare(RunContext(model=model, hardware=hardware, cost=cost, cache=cache, trace=source, plan=plan))
    if model is not None:
        cache.preload(system.initial_residents(model))
    server = LayerServer(system, cache, expert_bytes,
                         model.expert_bytes(system.low_precision_dtype) if model is not None else 1)
    per_hits = np.zeros(num_layers, dtype=np.int64)
    per_misses = np.zeros(num_layers, dtype=np.int64)
    for _, layer, plan_l in serve_layers(iterations, source, system, cache, server, scope=scope,
                                         layer_index=layer_index):
        per_hits[layer] += plan_l.hits
        per_misses[layer] += plan_l.misses
    return CacheReplayResult(hits=int(per_hits.sum()), misses=int(per_misses.sum()),
                             wall_s=time.perf_counter() - t0, per_layer_hits=per_hits,
                             per_layer_misses=per_misses)


def serve_layers(iterations, source: RoutingTrace, system: System, cache: ExpertCache, server: LayerServer, *,
                 scope: str, layer_index: np.ndarray | None = None):
    """Walk ``iterations`` through the LayerServer with no timing: at each request's first
    iteration the cache empties (``scope`` "request") and the system hears of the request; then
    each MoE layer is observed, served, its copies marked landed, and finished. Yields
    ``(iteration, layer, plan)`` after the layer is served and before it is finished (the
    caller reads the plan; the cache is as the layer left it). ``layer_index``: one layer per
    iteration (the flattened ``standard`` stream), else every layer. Observations carry
    ``now_ns=0`` and outcomes no times: callers use it for systems whose decisions do not read
    time (the cache replay, the fast engine's general eviction pass)."""
    from expertsim.policies import LayerOutcome

    num_layers = source.num_layers
    current = None
    for it in iterations:
        if it.request != current:
            current = it.request
            if scope == "request":
                cache.reset()
            system.on_request_start(it.request)
        tokens = it.tokens
        rows = it.rows
        layers = (int(layer_index[it.start]),) if layer_index is not None else range(num_layers)
        for layer in layers:
            col = 0 if layer_index is not None else layer
            weights = None if source.weights is None else source.weights[rows, col]
            obs = server.observe(now_ns=0, iteration=it.index, layer=layer, tokens=tokens,
                                 experts=source.experts[rows, col], weights=weights,
                                 phase=it.phase, trace=source)
            plan_l, _ = server.serve(obs)
            for item in plan_l.items:
                if item.copy_bytes:
                    cache.mark_resident(layer, item.expert)
            for pf in plan_l.prefetches:
                cache.mark_resident(pf.layer, pf.expert)
            yield it, layer, plan_l
            server.finish(obs, plan_l, LayerOutcome(layer, plan_l.hits, plan_l.misses, 0, 0, 0))
