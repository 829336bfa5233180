"""The expert cache of :mod:`expertsim.sim.fast.prefetching` as compiled helpers: the eviction
policies' victim (LRU, FIFO, a static hot set), an eviction and a slot (the
:class:`~expertsim.policies.cache.ExpertCache`'s free-slot stack), and the LayerServer's serve
orders (hits first, or cache-aware)."""
from __future__ import annotations

import numpy as np

from expertsim.policies.allocation_kernels import proportional_split
from expertsim.sim.fast.jit import _njit, _njit_inline
from expertsim.sim.fast.link_kernels import ABSENT


@_njit
def _victim(pins, score, slot_key, p, used_slots, exclude, counts):
    """The unpinned entry of partition ``p`` (not ``exclude``) with the lowest score (ties:
    lowest key), or -1: ``_KeyedPolicy.victim`` over ``ExpertCache._candidates``. With ``counts``
    (a static hot set's profile, else empty): the lowest count first, then the score (recency), as
    ``StaticHotSet.victim``. It reads the partition's slots (``slot_key``: the key in each slot
    handed out so far, or -1), not every key: the order is the same, (count,) score, key."""
    best = -1
    ranked = counts.shape[0] > 0
    for s in range(used_slots):
        key = slot_key[p, s]
        if key < 0 or pins[key] != 0 or key == exclude:
            continue
        if best < 0:
            best = key
            continue
        if ranked:
            if counts[key] != counts[best]:
                if counts[key] < counts[best]:
                    best = key
                continue
        if score[key] < score[best] or (score[key] == score[best] and key < best):
            best = key
    return best


@_njit_inline
def _evict(key, cstate, slot, slot_key, free, nfree, used, prefetched, ebytes, lowp, per_layer, num_experts):
    """ExpertCache._remove: the entry leaves (its slot freed); the bytes it held."""
    p = key // num_experts if per_layer else 0
    nb = ebytes[key]
    used[p] -= nb
    free[p, nfree[p]] = slot[key]
    nfree[p] += 1
    slot_key[p, slot[key]] = -1
    cstate[key] = ABSENT
    prefetched[key] = False
    lowp[key] = False
    ebytes[key] = 0
    slot[key] = -1
    return nb


@_njit
def _unpinned_bytes(pins, ebytes, slot_key, p, used_slots, exclude):
    """The bytes the unpinned entries of partition ``p`` (not ``exclude``) hold: what evicting
    every candidate frees (ExpertCache._frees)."""
    total = 0
    for s in range(used_slots):
        key = slot_key[p, s]
        if key >= 0 and pins[key] == 0 and key != exclude:
            total += ebytes[key]
    return total


@_njit_inline
def _take_slot(p, key, slot, slot_key, free, nfree, next_slot):
    """A free slot of partition ``p`` for ``key`` (the last freed first, else a new one)."""
    if nfree[p] > 0:
        nfree[p] -= 1
        s = free[p, nfree[p]]
    else:
        s = next_slot[p]
        next_slot[p] += 1
    slot[key] = s
    slot_key[p, s] = key
    return s


@_njit
def _serve_order(it_key, it_hit, it_load, it_tick, it_tok, it_acc, n, nh, scratch):
    """Stable partition of the items (ascending ids) into hits then misses, in place."""
    k2 = scratch[0]
    h2 = scratch[1]
    l2 = scratch[2]
    t2 = scratch[3]
    o2 = scratch[4]
    a2 = scratch[5]
    a = 0
    b = nh
    for i in range(n):
        j = a if it_hit[i] else b
        k2[j] = it_key[i]
        h2[j] = 1 if it_hit[i] else 0
        l2[j] = 1 if it_load[i] else 0
        t2[j] = it_tick[i]
        o2[j] = it_tok[i]
        a2[j] = it_acc[i]
        if it_hit[i]:
            a += 1
        else:
            b += 1
    for i in range(n):
        it_key[i] = k2[i]
        it_hit[i] = h2[i] == 1
        it_load[i] = l2[i] == 1
        it_tick[i] = t2[i]
        it_tok[i] = o2[i]
        it_acc[i] = a2[i]


@_njit
def _cache_aware(it_key, it_hit, it_load, it_tick, it_tok, it_acc, n):
    """Insertion sort of the items by (resident / loading / miss, -tokens, id), in place."""
    for i in range(1, n):
        key, hit, load, tick, tok, acc = it_key[i], it_hit[i], it_load[i], it_tick[i], it_tok[i], it_acc[i]
        rank = 2 if not hit else (1 if load else 0)
        j = i - 1
        while j >= 0:
            r = 2 if not it_hit[j] else (1 if it_load[j] else 0)
            if r < rank or (r == rank and (it_tok[j] > tok or (it_tok[j] == tok and it_key[j] < key))):
                break
            it_key[j + 1], it_hit[j + 1], it_load[j + 1] = it_key[j], it_hit[j], it_load[j]
            it_tick[j + 1], it_tok[j + 1], it_acc[j + 1] = it_tick[j], it_tok[j], it_acc[j]
            j -= 1
        it_key[j + 1], it_hit[j + 1], it_load[j + 1] = key, hit, load
        it_tick[j + 1], it_tok[j + 1], it_acc[j + 1] = tick, tok, acc


@_njit
def _victim_priority(pins, last, slot_key, p, used_slots, exclude, prefetched, current, eam, row_sum, freq, total,
                     num_moe, num_experts):
    """ActivationPriority.victim (MoE-Infinity) over partition ``p``'s unpinned entries (not
    ``exclude``): the lowest layer proximity x (request activation + 1e-6) x (frequency + 1e-6),
    the float64 arithmetic of ``_victim_few`` in its order; ties: least recent, then lowest key.
    An entry prefetched for a layer after ``current`` is kept while another candidate remains."""
    n = 0
    waiting = 0
    for s in range(used_slots):
        key = slot_key[p, s]
        if key >= 0 and pins[key] == 0 and key != exclude:
            n += 1
            if prefetched[key] and key // num_experts > current:
                waiting += 1
    drop = 0 < waiting < n
    best = -1
    best_rank = 0.0
    for s in range(used_slots):
        key = slot_key[p, s]
        if key < 0 or pins[key] != 0 or key == exclude:
            continue
        layer = key // num_experts
        if drop and prefetched[key] and layer > current:
            continue
        expert = key - layer * num_experts
        topo = 1.0 if layer <= current else 1.0 - layer / num_moe
        a = eam[layer, expert] / max(row_sum[layer], 1e-12) if row_sum[layer] > 0 else 1.0 / num_experts
        f = freq[layer, expert] / total if total > 0 else 1.0
        rank = topo * (a + 1e-6) * (f + 1e-6)
        if best < 0 or rank < best_rank or (rank == best_rank and (last[key] < last[best] or (
                last[key] == last[best] and key < best))):
            best = key
            best_rank = rank
    return best


@_njit
def _victim_sequence(pins, last, slot_key, p, used_slots, exclude, count, num_experts):
    """SequenceActivation.victim (DAOP): the fewest uses by the current request (``count``
    [layers, experts]), then the least recent, then the lowest key."""
    best = -1
    for s in range(used_slots):
        key = slot_key[p, s]
        if key < 0 or pins[key] != 0 or key == exclude:
            continue
        c = count[key // num_experts, key % num_experts]
        if best < 0:
            best = key
            continue
        b = count[best // num_experts, best % num_experts]
        if c < b or (c == b and (last[key] < last[best] or (last[key] == last[best] and key < best))):
            best = key
    return best


@_njit_inline
def _pick_victim(ev_kind, pins, last, slot_key, p, used_slots, exclude, counts, prefetched, current, eam, row_sum,
                 freq, total, num_moe, num_experts):
    """The eviction policy's victim: the keyed policies' (:func:`_victim`), ActivationPriority's
    (1) or SequenceActivation's (2, ``eam`` holding the request's counts), for :func:`_reallocate`.
    The kernel calls the three itself: inlined, this takes a reference to each of its arrays at
    every call."""
    if ev_kind == 1:
        return _victim_priority(pins, last, slot_key, p, used_slots, exclude, prefetched, current, eam, row_sum, freq,
                                total, num_moe, num_experts)
    if ev_kind == 2:
        return _victim_sequence(pins, last, slot_key, p, used_slots, exclude, eam, num_experts)
    return _victim(pins, last, slot_key, p, used_slots, exclude, counts)


@_njit
def _reallocate(worked, slots, minimum, cap, used, expert_bytes, pins, last, slot_key, next_slot, counts, prefetched,
                current, eam, row_sum, freq, total, ev_kind, cstate, slot, free, nfree, ebytes, lowp, num_moe,
                num_experts):
    """CrossLayerAllocator's reallocation: per-layer partitions resized in proportion to the
    working sets (``worked``), shrinking first (a stable sort of the change), each shrunk one
    evicting its policy's victims until it fits; the bytes evicted."""
    demand = np.zeros(num_moe, dtype=np.int64)
    for layer in range(num_moe):
        for e in range(num_experts):
            if worked[layer, e]:
                demand[layer] += 1
    n_slots = 0
    for layer in range(num_moe):
        n_slots += slots[layer]
    target = proportional_split(n_slots, demand, minimum, num_experts)
    order = np.arange(num_moe)  # np.argsort(target - slots, kind="stable"), by insertion
    for i in range(1, num_moe):
        x = order[i]
        j = i - 1
        while j >= 0 and target[order[j]] - slots[order[j]] > target[x] - slots[x]:
            order[j + 1] = order[j]
            j -= 1
        order[j + 1] = x
    freed = 0
    no_key, per_layer = np.int64(-1), np.bool_(True)  # typed, as the kernel passes them
    for layer in order:
        if target[layer] != slots[layer]:
            cap[layer] = target[layer] * expert_bytes
            while cap[layer] - used[layer] < 0:
                v = _pick_victim(ev_kind, pins, last, slot_key, layer, next_slot[layer], no_key, counts, prefetched,
                                 current, eam, row_sum, freq, total, num_moe, num_experts)
                freed += _evict(v, cstate, slot, slot_key, free, nfree, used, prefetched, ebytes, lowp, per_layer,
                                num_experts)
    for layer in range(num_moe):
        slots[layer] = target[layer]
    worked[:] = False
    return freed
