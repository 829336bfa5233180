"""The classic stream replay (evict on insert, one cache): LRU, FIFO or Belady over one key
array, the stream the ``standard`` semantics replay; benchmarked against libCacheSim.
"""
from __future__ import annotations

import numpy as np

from expertsim.errors import ConfigError
from expertsim.sim.fast.belady import _compact_heap, _heap_pop, _key_bits, _next_uses, _sift_up
from expertsim.sim.fast.jit import _njit
from expertsim.sim.fast.lru import _append, _unlink

STREAM_POLICIES = {"lru": 0, "fifo": 1, "belady": 2}


@_njit
def _stream_kernel(keys, capacity, policy):
    """Classic evict-on-insert replay of one key stream through one cache of ``capacity``
    entries. policy 0 = LRU, 1 = FIFO, 2 = Belady (farthest next use). Returns hit[access]."""
    n = keys.shape[0]
    hit = np.zeros(n, dtype=np.bool_)
    if n == 0:
        return hit
    num_keys = 0
    for i in range(n):
        if keys[i] + 1 > num_keys:
            num_keys = keys[i] + 1
    if policy == 2:
        # Belady: next uses in one backward pass, then a max-heap of next_use << bits | key
        # (farthest next use first, ties to the higher key) with lazy deletion of stale entries.
        bits = _key_bits(num_keys)
        mask = (1 << bits) - 1
        next_use, _ = _next_uses(keys, num_keys)
        cur_next = np.full(num_keys, -1, dtype=np.int64)  # -1: absent
        limit = 2 * capacity + 64
        heap = np.empty(limit + 1, dtype=np.int64)
        size = 0
        count = 0
        for i in range(n):
            key = keys[i]
            if cur_next[key] >= 0:
                hit[i] = True
            else:
                if count >= capacity:
                    while True:  # pop until a live entry
                        top, size = _heap_pop(heap, size)
                        k = top & mask
                        if cur_next[k] == top >> bits:
                            cur_next[k] = -1
                            count -= 1
                            break
                count += 1
            cur_next[key] = next_use[i]
            if size == limit:  # drop stale entries, re-heapify
                size = _compact_heap(heap, size, cur_next, bits)
            heap[size] = (next_use[i] << bits) | key
            size += 1
            _sift_up(heap, size - 1)
        return hit
    nxt = np.empty(num_keys + 1, dtype=np.int64)
    prv = np.empty(num_keys + 1, dtype=np.int64)
    present = np.zeros(num_keys, dtype=np.bool_)
    s = num_keys
    nxt[s] = s
    prv[s] = s
    count = 0
    for i in range(n):
        key = keys[i]
        if present[key]:
            hit[i] = True
            if policy != 0:  # FIFO: a hit does not move
                continue
            _unlink(nxt, prv, present, key)  # LRU: to the most recent end
        elif count >= capacity:
            _unlink(nxt, prv, present, nxt[s])  # the oldest leaves
        else:
            count += 1
        present[key] = True
        _append(nxt, prv, s, key)
    return hit


def replay_stream(keys: np.ndarray, capacity: int, policy: str = "lru") -> np.ndarray:
    """Hit mask of a classic (evict-on-insert, one cache) replay of ``keys``: LRU, FIFO or Belady
    (evict the entry whose next use is farthest). The stream the ``standard`` semantics replay."""
    if policy not in STREAM_POLICIES:
        raise ConfigError(f"stream policy must be one of {sorted(STREAM_POLICIES)}, got {policy!r}")
    if capacity < 1:
        raise ConfigError(f"capacity must be at least 1, got {capacity}")
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    if len(keys) and keys.min() < 0:  # the kernel indexes arrays by key
        raise ConfigError(f"stream keys must be >= 0, got {int(keys.min())} at position {int(keys.argmin())}")
    return _stream_kernel(keys, int(capacity), STREAM_POLICIES[policy])
