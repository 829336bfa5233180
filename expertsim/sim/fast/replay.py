"""Cache-only replays on the fast kernels: the fast path of
:func:`expertsim.sim.cache_replay.replay_cache` (built-in systems, in memory) and the streamed
per-layer LRU replay of a long-format Parquet trace (bounded memory).
"""
from __future__ import annotations

import time

import numpy as np

from expertsim.errors import ConfigError
from expertsim.sim.fast.groups import AccessGroups, _capacity_slots, groups_from_passes
from expertsim.sim.fast.lru import _lru_stream_steps, _lru_steps, new_lru_state, run_lru
from expertsim.sim.fast.support import _builtin_kind


def replay_cache_fast(trace, system, cache_config, *, model=None, phase: str = "decode",
                      scope: str = "request", semantics: str = "together", per_token: bool = True):
    """The fast path of :func:`expertsim.sim.cache_replay.replay_cache`: the same hits and
    misses, per layer and in total. ``per_token``: every token its own pass (the cache replay's
    definition), else the trace's passes (a prefill pass needs the union of its experts)."""
    from expertsim.sim.replay_setup import CacheReplayResult, prepare_replay

    kind = _builtin_kind(system)
    if kind is None:
        raise ConfigError(f"the fast engine does not support policy {system.label!r}; use --engine des")
    t0 = time.perf_counter()
    view, num_layers, num_experts, expert_bytes, cache_config = prepare_replay(
        trace, system, cache_config, model=model, phase=phase, scope=scope, semantics=semantics)
    # The ExpertCache's own size checks, with the same messages.
    from expertsim.policies.cache import ExpertCache

    top_k = 1 if semantics == "standard" else view.top_k
    ExpertCache(num_layers, num_experts, expert_bytes, cache_config, system.eviction, top_k=top_k)
    capacity, per_layer = _capacity_slots(cache_config, num_layers, num_experts, expert_bytes)
    n, L, k = view.experts.shape
    new_request = np.zeros(n, dtype=bool)
    if scope == "request":
        new_request[0] = True
        new_request[1:] = view.request[1:] != view.request[:-1]
    num_keys = num_layers * num_experts
    initial = None
    if model is not None:
        initial = np.asarray(system.initial_residents(model), dtype=np.int64)
        if kind == "all-on-gpu":
            new_request[:] = False  # a reset reloads every expert (ExpertCache.preload): no change
    if semantics == "standard":
        # The flattened stream: (token, layer, sorted expert) order, each access alone.
        keys = (np.sort(view.experts, axis=2).astype(np.int64)
                + (np.arange(L, dtype=np.int64) * num_experts)[None, :, None]).ravel()
        reset = np.zeros(len(keys), dtype=bool)
        reset[::L * k] = new_request
        if initial is None or not len(initial):
            part = keys // num_experts if per_layer else np.zeros(len(keys), dtype=np.int64)
            hit = _lru_stream_steps(keys, part, reset, kind == "no-cache", kind != "fifo", capacity, num_keys)
        else:  # a warm start (all-on-gpu): groups of one through the general kernel
            ones = AccessGroups(keys=keys, tokens=np.ones(len(keys), dtype=np.int64),
                                start=np.arange(len(keys) + 1, dtype=np.int64), layer=keys // num_experts,
                                pass_index=np.zeros(len(keys), dtype=np.int64))
            hit, _, _ = run_lru(ones, capacity=capacity, per_layer=per_layer, reset=reset,
                                clear_after=kind == "no-cache", num_keys=num_keys, initial=initial,
                                refresh=kind != "fifo")
    else:
        starts = np.arange(n + 1, dtype=np.int64) if per_token else view.pass_starts()
        groups = groups_from_passes(view.experts, starts, num_experts)
        keys = groups.keys
        reset = np.zeros(groups.num_groups, dtype=bool)
        reset[::L] = new_request[starts[:-1]]
        hit, _, _ = run_lru(groups, capacity=capacity, per_layer=per_layer, reset=reset,
                            clear_after=kind == "no-cache", num_keys=num_keys, initial=initial,
                            refresh=kind != "fifo")
    layer_of_access = keys // num_experts
    per_hits = np.bincount(layer_of_access[hit], minlength=num_layers).astype(np.int64)
    per_all = np.bincount(layer_of_access, minlength=num_layers).astype(np.int64)
    per_misses = per_all - per_hits
    return CacheReplayResult(hits=int(per_hits.sum()), misses=int(per_misses.sum()),
                             wall_s=time.perf_counter() - t0, per_layer_hits=per_hits,
                             per_layer_misses=per_misses)


def replay_parquet_fast(path, cache_config, *, phase: str = "decode", scope: str = "request",
                        num_experts: int | None = None, chunk_tokens: int = 10_000):
    """Per-token LRU replay ("together" semantics, the base System) of a long-format Parquet
    trace (one row per token and MoE layer, sorted by request, position, layer), streamed
    ``chunk_tokens`` tokens at a time so that memory stays bounded: the same counts as
    ``replay_cache(read_trace(path), make_policy("lru"), cache_config, phase=..., scope=...)``
    without holding the trace."""
    import polars as pl

    from expertsim.sim.replay_setup import CacheReplayResult

    if phase not in ("decode", "prefill", "all"):
        raise ConfigError(f"phase must be prefill, decode or all, got {phase!r}")
    if scope not in ("request", "global"):
        raise ConfigError(f"--scope must be 'request' or 'global', got {scope!r}")
    t0 = time.perf_counter()
    lf = pl.scan_parquet(path)
    names = lf.collect_schema().names()
    expert_cols = sorted((c for c in names if c.startswith("expert_")), key=lambda c: int(c.split("_")[1]))
    stats = lf.select(pl.len().alias("rows"), pl.col("layer").max().alias("layer"),
                      pl.max_horizontal([pl.col(c).max() for c in expert_cols]).alias("expert"),
                      pl.min_horizontal([pl.col(c).min() for c in expert_cols]).alias("lowest")).collect()
    rows, num_layers = int(stats["rows"][0]), int(stats["layer"][0]) + 1
    top, lowest = int(stats["expert"][0]), int(stats["lowest"][0])
    E = int(num_experts or top + 1)
    if lowest < 0 or top >= E:  # the kernels index arrays by expert id: refuse before they run
        raise ConfigError(
            f"{path}: expert ids run from {lowest} to {top}, outside 0..{E - 1} for {E} experts; "
            + ("ids start at 0" if lowest < 0 else "pass the model's expert count (num_experts) or check the trace")
        )
    k = len(expert_cols)
    capacity, per_layer = _capacity_slots(cache_config, num_layers, E, 1)
    if (capacity < k).any():
        raise ConfigError(f"the cache must hold at least top-k={k} experts per partition")
    state = new_lru_state(capacity, num_layers * E)
    per_hits = np.zeros(num_layers, dtype=np.int64)
    per_all = np.zeros(num_layers, dtype=np.int64)
    last_request = None
    want = None if phase == "all" else phase
    for offset in range(0, rows, chunk_tokens * num_layers):
        df = lf.slice(offset, chunk_tokens * num_layers).select(
            ["request", pl.col("phase").cast(pl.String), "layer", *expert_cols]).collect()
        n = df.height // num_layers
        if n * num_layers != df.height or not (df["layer"].to_numpy().reshape(n, num_layers)
                                               == np.arange(num_layers)).all():
            raise ConfigError(f"{path}: rows are not one per token and MoE layer in layer order")
        experts = np.stack([df[c].to_numpy() for c in expert_cols], axis=1).reshape(n, num_layers, k)
        request = df["request"].to_numpy()[::num_layers].astype(np.int64)
        if want is not None:
            keep = df["phase"].to_numpy()[::num_layers] == want
            experts, request = experts[keep], request[keep]
        if len(request) == 0:
            continue
        groups = groups_from_passes(experts, np.arange(len(request) + 1, dtype=np.int64), E)
        del experts
        keys, start, layer = groups.keys, groups.start, groups.layer
        reset = np.zeros(len(layer), dtype=bool)
        if scope == "request":
            new = np.ones(len(request), dtype=bool)
            new[1:] = request[1:] != request[:-1]
            new[0] = request[0] != last_request
            reset[::num_layers] = new
        last_request = request[-1]
        gpart = layer if per_layer else np.zeros(len(layer), dtype=np.int64)
        hit, _ = _lru_steps(keys, start, gpart, reset, False, True, capacity, num_layers * E, *state)
        layer_of = keys // E
        per_hits += np.bincount(layer_of[hit], minlength=num_layers)
        per_all += np.bincount(layer_of, minlength=num_layers)
    return CacheReplayResult(hits=int(per_hits.sum()), misses=int((per_all - per_hits).sum()),
                             wall_s=time.perf_counter() - t0, per_layer_hits=per_hits,
                             per_layer_misses=per_all - per_hits)
