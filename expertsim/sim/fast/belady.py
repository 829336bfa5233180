"""Belady's optimal eviction for the sequence of needed *sets* (the link bound of
:func:`expertsim.sim.bounds.run_bounds`): after each group keep the ``slots`` entries with the
nearest next use. Two kernels with the same choice: a max-heap of ``next_use << bits | key``
with lazy deletion, and a scan for small partitions; the heap helpers are shared with the
classic stream replay (:mod:`expertsim.sim.fast.stream`).
"""
from __future__ import annotations

import numpy as np

from expertsim.sim.fast.groups import AccessGroups, _widest_group
from expertsim.sim.fast.jit import _njit

SMALL_BELADY_ENTRIES = 48  # set-Belady partitions up to this many entries scan instead of keeping a heap


@_njit
def _next_uses(keys, num_keys):
    """One backward scan: each access's next use of its key (``len(keys)``: never), and each
    key's first use."""
    n = keys.shape[0]
    nxt_use = np.full(n, n, dtype=np.int64)
    first_use = np.full(num_keys, n, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        key = keys[i]
        nxt_use[i] = first_use[key]
        first_use[key] = i
    return nxt_use, first_use


@_njit
def _set_belady_kernel(keys, gstart, gpart, num_parts, slots, num_keys, initial):
    """Copies of the optimal policy for the sequence of needed *sets* (expertsim.sim.bounds: after
    each step keep the ``slots`` entries with the nearest next use, ties to the lower key;
    a needed expert may be dropped right after use). Group g belongs to partition ``gpart[g]``
    (a key lives in one partition: ``key * num_parts // num_keys``); the partitions are
    independent, each with its own max-heap of ``next_use << bits | key``, all replayed in one
    pass in group order."""
    bits = _key_bits(num_keys)
    mask = (1 << bits) - 1
    nxt_use, first_use = _next_uses(keys, num_keys)
    misses = 0
    cur = np.full(num_keys, -1, dtype=np.int64)  # next use of each cached key, -1: absent
    width = _widest_group(gstart)
    limit = 2 * (slots + width) + initial.shape[0] + 64
    heaps = np.empty((num_parts, limit + 1), dtype=np.int64)
    sizes = np.zeros(num_parts, dtype=np.int64)
    counts = np.zeros(num_parts, dtype=np.int64)
    for j in range(initial.shape[0]):
        key = initial[j]
        p = key * num_parts // num_keys
        if counts[p] < slots and cur[key] < 0:
            cur[key] = first_use[key]
            counts[p] += 1
            heaps[p, sizes[p]] = (cur[key] << bits) | key
            sizes[p] += 1
            _sift_up(heaps[p], sizes[p] - 1)
    for g in range(gstart.shape[0] - 1):
        p = gpart[g]
        heap = heaps[p]
        size = sizes[p]
        count = counts[p]
        for i in range(gstart[g], gstart[g + 1]):
            key = keys[i]
            if cur[key] < 0:
                misses += 1
                count += 1
            cur[key] = nxt_use[i]
            if size >= limit:  # drop stale entries, re-heapify
                size = _compact_heap(heap, size, cur, bits)
            heap[size] = (nxt_use[i] << bits) | key
            size += 1
            _sift_up(heap, size - 1)
        while count > slots:  # drop the farthest next uses (lazily deleted stale entries skipped)
            top, size = _heap_pop(heap, size)
            key = top & mask
            if cur[key] == top >> bits:
                cur[key] = -1
                count -= 1
        sizes[p] = size
        counts[p] = count
    return misses


@_njit
def _set_belady_small(keys, gstart, gpart, num_parts, slots, num_keys, initial):
    """:func:`_set_belady_kernel` for small partitions (``slots`` plus the widest group within
    a few dozen entries): each partition's members in a short array, the farthest next use
    found by a scan, with the same choice (the largest ``next_use << bits | key``)."""
    bits = _key_bits(num_keys)
    nxt_use, first_use = _next_uses(keys, num_keys)
    width = _widest_group(gstart)
    stride = slots + width + 1
    members = np.empty(num_parts * stride, dtype=np.int64)  # partition p's keys at p * stride
    size = np.zeros(num_parts, dtype=np.int64)
    where = np.full(num_keys, -1, dtype=np.int64)  # index of a cached key in its partition's members
    cur = np.zeros(num_keys, dtype=np.int64)  # next use of each cached key
    for j in range(initial.shape[0]):
        key = initial[j]
        p = key * num_parts // num_keys
        if size[p] < slots and where[key] < 0:
            where[key] = size[p]
            members[p * stride + size[p]] = key
            size[p] += 1
            cur[key] = first_use[key]
    misses = 0
    for g in range(gstart.shape[0] - 1):
        p = gpart[g]
        base = p * stride
        m = size[p]
        for i in range(gstart[g], gstart[g + 1]):
            key = keys[i]
            if where[key] < 0:
                misses += 1
                where[key] = m
                members[base + m] = key
                m += 1
            cur[key] = nxt_use[i]
        while m > slots:  # drop the farthest next use (ties: the higher key)
            best = 0
            best_value = -1
            for j in range(m):
                key = members[base + j]
                value = (cur[key] << bits) | key
                if value > best_value:
                    best_value = value
                    best = j
            gone = members[base + best]
            m -= 1
            last = members[base + m]
            members[base + best] = last
            where[last] = best
            where[gone] = -1
        size[p] = m
    return misses


@_njit
def _key_bits(num_keys):
    """Bits that hold any key below ``num_keys`` (heap entries pack ``next_use << bits | key``)."""
    bits = 1
    while (1 << bits) < num_keys:
        bits += 1
    return bits


@_njit
def _sift_up(heap, i):
    """Max-heap: move heap[i] up."""
    while i > 0:
        parent = (i - 1) // 2
        if heap[parent] >= heap[i]:
            break
        heap[parent], heap[i] = heap[i], heap[parent]
        i = parent


@_njit
def _heap_pop(heap, size):
    """Remove the top of the heap ``heap[:size]``; returns (top, new size)."""
    top = heap[0]
    size -= 1
    heap[0] = heap[size]
    _sift_down(heap, size, 0)
    return top, size


@_njit
def _sift_down(heap, size, i):
    """Max-heap of ``size`` entries: move heap[i] down."""
    while True:
        left = 2 * i + 1
        big = i
        if left < size and heap[left] > heap[big]:
            big = left
        if left + 1 < size and heap[left + 1] > heap[big]:
            big = left + 1
        if big == i:
            return
        heap[big], heap[i] = heap[i], heap[big]
        i = big


@_njit
def _compact_heap(heap, size, cur, bits):
    """Keep the live entries (``cur[key]`` still equals the entry's next use) and re-heapify;
    returns the new size. Entries are ``next_use << bits | key``."""
    live = 0
    mask = (1 << bits) - 1
    for j in range(size):
        if cur[heap[j] & mask] == heap[j] >> bits:
            heap[live] = heap[j]
            live += 1
    for j in range(live // 2 - 1, -1, -1):
        _sift_down(heap, live, j)
    return live


def _belady_misses(model, groups: AccessGroups, cache_config, initial) -> int:
    """Copies Belady's optimal eviction needs for the runs' needed sets (the link bound of
    :func:`expertsim.sim.bounds.run_bounds`), from the access groups."""
    L, E = model.num_moe_layers, model.num_experts
    if cache_config.per_layer is not None:
        parts, slots = L, int(cache_config.per_layer)
    else:
        parts, slots = 1, int(cache_config.capacity_bytes(L, E, model.expert_bytes()) // model.expert_bytes())
    gpart = groups.layer if parts > 1 else np.zeros(groups.num_groups, dtype=np.int64)
    width = int(np.diff(groups.start).max()) if groups.num_groups else 1
    kernel = _set_belady_small if slots + width <= SMALL_BELADY_ENTRIES else _set_belady_kernel
    return int(kernel(groups.keys, groups.start, gpart, parts, slots, L * E, np.asarray(initial, dtype=np.int64)))
