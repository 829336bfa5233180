"""Analytical lower bounds on a run's simulated time.

- Compute-only bound: every expert resident, no copies, no stalls: the GPU stream's dense layers
  plus every needed expert's FFN, iteration by iteration (the same cost terms the engines use).
- Link bound: the expert copies that even an optimal eviction policy must make for this cache
  configuration, times the wire time of one copy (bytes over the link bandwidth; the per-copy
  overhead is left out, since several copy engines may overlap it). The engines look a layer's
  needed experts up all at once (the "together" semantics: hits are served first, then the misses
  are copied), so the access sequence is a sequence of *sets*: at step t (one MoE layer of one
  iteration) the set S_t is needed, |S_t - C_t| experts must be copied (C_t: the cache's content at
  the step's start), and C_{t+1} can be at most ``slots`` of C_t + S_t. Belady's rule for this
  model (keep the ``slots`` experts of C_t + S_t whose next use is nearest; a needed expert may be
  dropped right after use) minimises the copies by the usual exchange argument; it is computed per
  cache partition (per MoE layer, or one global pool), starting from the system's initial
  residents. Copying ahead (prefetch) cannot reduce the number of copies below it, and the
  engines' extra constraints (a needed expert occupies a slot while it is copied and computed)
  only add copies, so the count is a lower bound for every policy.

Both hold for policies that compute every needed expert on the GPU from a full-precision copy
(copy on miss, prefetching, any eviction); a policy that skips experts, computes them on the CPU,
or copies low-precision versions can go below them (reported as such).
"""
from __future__ import annotations

import heapq

import numpy as np

from expertsim.policies import AccessPlan, CacheConfig
from expertsim.sim.workload import Iteration


def compute_bound_ns(cost, model, trace, iterations: list[Iteration]) -> int:
    """Dense layers + every needed expert's FFN on the GPU, summed over the iterations."""
    L, E = trace.num_layers, model.num_experts
    offsets = (np.arange(L, dtype=np.int64) * E)[None, :, None]
    total = 0
    for it in iterations:
        total += model.num_layers * cost.dense_layer_time_ns(it.num_tokens, it.context_tokens, it.attention_pairs)
        block = trace.experts[it.rows].astype(np.int64)
        counts = np.bincount((block + offsets).ravel(), minlength=L * E)
        sizes, mult = np.unique(counts[counts > 0], return_counts=True)
        total += sum(int(n) * cost.expert_time_ns(int(t)) for t, n in zip(sizes.tolist(), mult.tolist()))
    return int(total)


def _capacity_slots(cache_config: CacheConfig, num_layers: int, num_experts: int, expert_bytes: int) -> tuple[int, int]:
    """(partitions, slots per partition) of a cache configuration, in full-precision experts."""
    if cache_config.unlimited:
        return 1, num_layers * num_experts
    if cache_config.per_layer is not None:
        return num_layers, int(cache_config.per_layer)
    if cache_config.global_slots is not None:
        return 1, int(cache_config.global_slots)
    return 1, int(cache_config.budget_bytes // expert_bytes) if expert_bytes > 0 else num_layers * num_experts


def needed_sets(trace, iterations: list[Iteration], num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """The run's access sequence as keys (layer x experts + expert) and a step id per key: one
    step per (iteration, MoE layer), the layer's needed experts ascending (the AccessPlan order)."""
    L = trace.num_layers
    offsets = np.arange(L, dtype=np.int64)[:, None] * num_experts
    keys, steps = [], []
    step0 = 0
    for it in iterations:
        block = trace.experts[it.rows].astype(np.int64)
        used = np.zeros((L, num_experts), dtype=bool)
        layer_idx = np.broadcast_to(np.arange(L)[None, :, None], block.shape)
        used[layer_idx.ravel(), block.ravel()] = True
        keys.append((offsets + np.arange(num_experts)[None, :])[used])
        steps.append(step0 + np.nonzero(used)[0])
        step0 += L
    if not keys:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(keys), np.concatenate(steps).astype(np.int64)


def belady_misses(plan: AccessPlan, *, partitions: int, slots: int, initial_residents=(),
                  steps: np.ndarray | None = None) -> int:
    """Copies of the optimal policy for the set sequence ``plan.keys`` grouped by ``steps``
    (default: every access its own step), with ``partitions`` caches of ``slots`` entries each
    (per layer, partition = key // num_experts, when ``partitions`` > 1). See the module
    docstring for the model."""
    keys = np.asarray(plan.keys, dtype=np.int64)
    n = len(keys)
    if n == 0:
        return 0
    steps = np.arange(n, dtype=np.int64) if steps is None else np.asarray(steps, dtype=np.int64)
    nxt = plan.next_use()
    E = plan.num_experts
    part = keys // E if partitions > 1 else np.zeros(n, dtype=np.int64)
    first_use: dict[int, int] = {}
    for pos, key in zip(range(n - 1, -1, -1), keys[::-1].tolist()):
        first_use[key] = pos
    misses = 0
    for p in np.unique(part).tolist():
        idx = np.flatnonzero(part == p)
        cache: dict[int, int] = {}  # key -> position of its next use (n: never)
        for key in (int(k) for k in initial_residents):
            if (key // E if partitions > 1 else 0) == p and len(cache) < slots:
                cache[key] = first_use.get(key, n)
        pk, ps, pn = keys[idx].tolist(), steps[idx].tolist(), nxt[idx].tolist()
        i = 0
        while i < len(pk):
            j = i
            while j < len(pk) and ps[j] == ps[i]:
                j += 1
            for key, nu in zip(pk[i:j], pn[i:j]):
                if key not in cache:
                    misses += 1
                cache[key] = nu
            if len(cache) > slots:
                keep = heapq.nsmallest(max(slots, 0), cache.items(), key=lambda kv: (kv[1], kv[0]))
                cache = dict(keep)
            i = j
    return misses


def run_bounds(cost, model, trace, iterations: list[Iteration], cache_config: CacheConfig, *,
               initial_residents=(), copy_chunk_bytes: int | None = None) -> dict:
    """The bounds of one run, in the metrics' units."""
    compute_ns = compute_bound_ns(cost, model, trace, iterations)
    keys, steps = needed_sets(trace, iterations, model.num_experts)
    plan = AccessPlan(keys=keys, num_experts=model.num_experts)
    partitions, slots = _capacity_slots(cache_config, model.num_moe_layers, model.num_experts, model.expert_bytes())
    misses = belady_misses(plan, partitions=partitions, slots=slots, initial_residents=initial_residents,
                           steps=steps)
    link_ns = misses * cost.chunked_wire_ns(model.expert_bytes(), copy_chunk_bytes)
    return {
        "compute_bound_s": compute_ns / 1e9,
        "link_bound_s": link_ns / 1e9,
        "bound_s": max(compute_ns, link_ns) / 1e9,
        "belady_misses": int(misses),
        "compute_bound_ns": int(compute_ns),
        "link_bound_ns": int(link_ns),
    }
