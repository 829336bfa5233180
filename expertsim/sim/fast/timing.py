"""The fast engine's timing: each access group (one MoE layer of one pass) timed with the
DES's ordering, from the cache kernels' hits and releases.

At batch 1 with no prefetch, every copy of a layer is requested at the layer's start (in serve
order), or when the compute of the item whose room it reuses ends; the single link serves them
first come, first served, which is serve order. The compute stream serves hits first, then each
miss once its copy has landed. All durations are integer nanoseconds from the same
:class:`~expertsim.sim.cost.CostModel`, so totals are equal to the DES's, not just close.
"""
from __future__ import annotations

import numpy as np

from expertsim.sim.fast.groups import _widest_group
from expertsim.sim.fast.jit import _njit


@_njit
def _timing_kernel(gstart, hit, release, tokens, expert_ns, copy_ns, groups_per_pass):
    """Each group (one MoE layer of one pass) timed with the DES's ordering (see the module
    docstring), summed per pass (groups ``p * groups_per_pass`` onwards): (duration_ns,
    stall_ns, expert_compute_ns, hits, accesses) per pass."""
    n_groups = gstart.shape[0] - 1
    n_passes = n_groups // groups_per_pass
    dur = np.zeros(n_passes, dtype=np.int64)
    stall = np.zeros(n_passes, dtype=np.int64)
    compute = np.zeros(n_passes, dtype=np.int64)
    hits = np.zeros(n_passes, dtype=np.int64)
    accesses = np.zeros(n_passes, dtype=np.int64)
    comp_end = np.zeros(_widest_group(gstart), dtype=np.int64)
    for g in range(n_groups):
        a = gstart[g]
        b = gstart[g + 1]
        cur = 0  # relative to the end of the layer's dense part
        link_free = 0
        waited = 0
        work = 0
        j = 0  # serve index
        for i in range(a, b):  # hits, ascending
            if hit[i]:
                t = expert_ns[tokens[i]]
                cur += t
                work += t
                comp_end[j] = cur
                j += 1
        h = j
        for i in range(a, b):  # misses, ascending; link order = serve order
            if not hit[i]:
                request = 0 if release[i] < 0 else comp_end[release[i]]
                start = link_free if link_free > request else request
                link_free = start + copy_ns
                if link_free > cur:
                    waited += link_free - cur
                    cur = link_free
                t = expert_ns[tokens[i]]
                cur += t
                work += t
                comp_end[j] = cur
                j += 1
        p = g // groups_per_pass
        dur[p] += cur
        stall[p] += waited
        compute[p] += work
        hits[p] += h
        accesses[p] += b - a
    return dur, stall, compute, hits, accesses


@_njit
def _resident_timing(gstart, tokens, expert_ns, groups_per_pass):
    """:func:`_timing_kernel` when every lookup hits (all-on-gpu): each group's experts computed
    one after another, nothing waits; without the hit and release arrays."""
    n_groups = gstart.shape[0] - 1
    n_passes = n_groups // groups_per_pass
    dur = np.zeros(n_passes, dtype=np.int64)
    accesses = np.zeros(n_passes, dtype=np.int64)
    for g in range(n_groups):
        p = g // groups_per_pass
        for i in range(gstart[g], gstart[g + 1]):
            dur[p] += expert_ns[tokens[i]]
        accesses[p] += gstart[g + 1] - gstart[g]
    return dur, np.zeros(n_passes, dtype=np.int64), dur.copy(), accesses, accesses.copy()


def _serial_timing(gstart, hit, tokens, expert_ns, copy_ns, host_ns, groups_per_pass):
    """:func:`_timing_kernel` for a runtime that queues copies on the compute stream (the DES's
    serial path): a miss's copy starts at its turn and overlaps only the expert call's host time
    (``host_ns`` = min(host time, the call's time)), so each miss costs its compute plus
    max(0, copy - host) of stall, and a hit its compute; nothing overlaps across items."""
    n_groups = len(gstart) - 1
    n_passes = n_groups // groups_per_pass
    t = expert_ns[tokens]
    host = np.minimum(host_ns, t)
    stall_i = np.where(hit, 0, np.maximum(copy_ns - host, 0))
    group_of = np.repeat(np.arange(n_groups), np.diff(gstart))
    pass_of = group_of // groups_per_pass

    def per_pass(values):
        return np.bincount(pass_of, weights=values, minlength=n_passes).astype(np.int64) if len(values) else \
            np.zeros(n_passes, dtype=np.int64)

    return (per_pass(t + stall_i), per_pass(stall_i), per_pass(t), per_pass(hit.astype(np.int64)),
            per_pass(np.ones(len(t), dtype=np.int64)))


def _bounds_metrics(cost, model, misses: int, *, dense_total_ns: int, expert_total_ns: int, copy_chunk_bytes) -> dict:
    """The bounds' metrics: compute-only = the run's dense plus expert compute (every needed
    expert computed once per layer and pass, which the base systems do); link = Belady's copies."""
    compute_ns = int(dense_total_ns + expert_total_ns)
    link_ns = misses * cost.chunked_wire_ns(model.expert_bytes(), copy_chunk_bytes)
    return {"compute_bound_s": compute_ns / 1e9, "link_bound_s": link_ns / 1e9,
            "bound_s": max(compute_ns, link_ns) / 1e9, "belady_misses": misses,
            "compute_bound_ns": compute_ns, "link_bound_ns": int(link_ns)}
