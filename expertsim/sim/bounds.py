"""Analytical lower bounds on a run's simulated time.

- Compute-only bound: every expert resident, no copies, no stalls: the GPU stream's dense layers
  plus every needed expert's FFN, iteration by iteration (the same cost terms the engines use).
- Link bound: the expert copies that even Belady's optimal eviction (MIN: evict the entry whose
  next use is furthest) must make for this cache configuration, times the wire time of one copy
  (bytes over the link bandwidth; the per-copy overhead is left out, since several copy engines
  may overlap it). MIN minimises the number of loads among all policies, prefetching ones
  included, for equal-size entries; it is computed per cache partition (per MoE layer, or one
  global pool) on the run's access sequence (iterations, then MoE layers, then the layer's needed
  experts ascending), starting from the system's initial residents. The "together" constraint
  (a layer's needed experts resident at once) only adds misses, so the count stays a lower bound.

Both hold for policies that compute every needed expert on the GPU from a full-precision copy
(copy on miss, prefetching, any eviction); a policy that skips experts, computes them on the CPU,
or copies low-precision versions can go below them (reported as such).
"""
from __future__ import annotations

import heapq

import numpy as np

from expertsim.policies import AccessPlan, CacheConfig
from expertsim.sim.workload import Iteration, build_access_plan


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


def belady_misses(plan: AccessPlan, *, partitions: int, slots: int, initial_residents=()) -> int:
    """Misses of Belady's MIN on ``plan`` with ``partitions`` caches (per layer when
    ``partitions`` > 1, keyed by layer = key // num_experts) of ``slots`` entries each."""
    keys = np.asarray(plan.keys, dtype=np.int64)
    n = len(keys)
    if n == 0:
        return 0
    nxt = plan.next_use()
    part = keys // plan.num_experts if partitions > 1 else np.zeros(n, dtype=np.int64)
    first_use: dict[int, int] = {}
    for pos, key in zip(range(n - 1, -1, -1), keys[::-1].tolist()):
        first_use[key] = pos
    misses = 0
    for p in np.unique(part).tolist():
        idx = np.flatnonzero(part == p)
        resident: dict[int, int] = {}  # key -> its next use
        heap: list[tuple[int, int]] = []
        for key in (int(k) for k in initial_residents):
            kp = key // plan.num_experts if partitions > 1 else 0
            if kp == p and len(resident) < slots:
                resident[key] = first_use.get(key, n)
                heapq.heappush(heap, (-resident[key], key))
        for pos, key, nu in zip(idx.tolist(), keys[idx].tolist(), nxt[idx].tolist()):
            if key not in resident:
                misses += 1
                if slots <= 0:
                    continue
                while len(resident) >= slots:
                    neg, victim = heapq.heappop(heap)
                    if resident.get(victim) == -neg:
                        del resident[victim]
            resident[key] = nu
            heapq.heappush(heap, (-nu, key))
    return misses


def run_bounds(cost, model, trace, iterations: list[Iteration], cache_config: CacheConfig, *,
               initial_residents=(), copy_chunk_bytes: int | None = None) -> dict:
    """The bounds of one run, in the metrics' units."""
    compute_ns = compute_bound_ns(cost, model, trace, iterations)
    plan = build_access_plan(trace, iterations, model.num_experts)
    partitions, slots = _capacity_slots(cache_config, model.num_moe_layers, model.num_experts, model.expert_bytes())
    misses = belady_misses(plan, partitions=partitions, slots=slots, initial_residents=initial_residents)
    link_ns = misses * cost.chunked_wire_ns(model.expert_bytes(), copy_chunk_bytes)
    return {
        "compute_bound_s": compute_ns / 1e9,
        "link_bound_s": link_ns / 1e9,
        "bound_s": max(compute_ns, link_ns) / 1e9,
        "belady_misses": int(misses),
        "compute_bound_ns": int(compute_ns),
        "link_bound_ns": int(link_ns),
    }
