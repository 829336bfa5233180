"""The LRU/FIFO cache kernels: one recency list per cache partition (per layer or one global
pool) as an intrusive doubly linked list over the keys, one sentinel node per partition.

:func:`_lru_steps` replays access groups with the LayerServer's "together" semantics: a
group's misses are appended in ascending id order (their lookup ticks; with LRU its hits move
there too), then the oldest unpinned entries leave until the misses fit. When every entry is
pinned (the union of a prefill pass is larger than the cache), the earliest-served items are
released in serve order, exactly as :meth:`LayerServer.serve` does, and the kernel records
which item each such copy waits for. :func:`_lru_stream_steps` is the ``standard`` semantics
(every access alone, evict on insert).
"""
from __future__ import annotations

import numpy as np

from expertsim.errors import ConfigError
from expertsim.sim.fast.groups import AccessGroups
from expertsim.sim.fast.jit import _njit


def new_lru_state(capacity: np.ndarray, num_keys: int, initial: np.ndarray | None = None) -> tuple:
    """The LRU kernel's state: per-partition recency lists (an intrusive doubly linked list over
    the keys, one sentinel node per partition), residency, entries per partition, and
    [total entries, peak entries]. ``initial`` keys are admitted in order (one global partition)."""
    num_parts = len(capacity)
    nodes = np.arange(num_keys + num_parts, dtype=np.int64)
    nxt, prv = nodes.copy(), nodes.copy()
    present = np.zeros(num_keys, dtype=bool)
    count = np.zeros(num_parts, dtype=np.int64)
    totals = np.zeros(2, dtype=np.int64)
    state = (nxt, prv, present, count, totals)
    if initial is not None and len(initial):
        _lru_admit_initial(np.asarray(initial, dtype=np.int64), num_keys, *state)
    return state


@_njit
def _lru_admit_initial(initial, num_keys, nxt, prv, present, count, totals):
    s = num_keys  # partition 0's sentinel
    for key in initial:
        last = prv[s]
        nxt[last] = key
        prv[key] = last
        nxt[key] = s
        prv[s] = key
        present[key] = True
        count[0] += 1
        totals[0] += 1
    totals[1] = max(totals[1], totals[0])


def _lru_kernel(keys, gstart, gpart, greset, clear_after, refresh, capacity, num_keys, initial):
    """Replay access groups from an empty cache holding ``initial``: see :func:`_lru_steps`.
    Returns (hit, release, peak_entries)."""
    state = new_lru_state(capacity, num_keys, initial)
    hit, release = _lru_steps(keys, gstart, gpart, greset, clear_after, refresh, capacity, num_keys, *state)
    return hit, release, int(state[4][1])


@_njit
def _lru_steps(keys, gstart, gpart, greset, clear_after, refresh, capacity, num_keys, nxt, prv, present, count,
               totals):
    """Replay access groups through per-partition recency lists with the LayerServer's
    "together" semantics, continuing from (and updating) the given state. ``refresh``: a hit
    moves the entry to the most recent end (LRU); without it the list stays in admission order
    (FIFO). Returns (hit[access],
    release[access]): ``release[i]`` is, for a miss whose admission had to release an item of
    its own group, that item's index in the group's serve order (hits ascending, then misses
    ascending), else -1."""
    num_parts = capacity.shape[0]
    total = totals[0]
    peak = totals[1]
    n_groups = gpart.shape[0]
    hit = np.zeros(keys.shape[0], dtype=np.bool_)
    release = np.full(keys.shape[0], -1, dtype=np.int32)
    pinned = np.zeros(num_keys, dtype=np.bool_)
    for g in range(n_groups):
        if greset[g]:
            for p in range(num_parts):
                _clear_list(nxt, prv, present, num_keys + p)
                count[p] = 0
            total = 0
        p = gpart[g]
        s = num_keys + p
        a = gstart[g]
        b = gstart[g + 1]
        n = b - a
        h = 0
        # Lookups in ascending id order: a miss is admitted with its lookup tick (the most recent
        # end); with LRU a hit becomes the most recent too.
        for i in range(a, b):
            key = keys[i]
            if not refresh:
                pinned[key] = True
            if present[key]:
                hit[i] = True
                h += 1
                if not refresh:
                    continue
                nxt[prv[key]] = nxt[key]  # unlink
                prv[nxt[key]] = prv[key]
            else:
                present[key] = True
            last = prv[s]
            nxt[last] = key
            prv[key] = last
            nxt[key] = s
            prv[s] = key
        m = n - h
        non_needed = count[p] - h
        excess = count[p] + m - capacity[p]
        # The oldest unpinned entries leave first (the group's own are pinned). With LRU the
        # group's entries are the list's n most recent, so the oldest ``evict`` are all unpinned.
        evict = excess if excess < non_needed else non_needed
        node = nxt[s]
        done = 0
        while done < evict:
            after = nxt[node]
            if refresh or not pinned[node]:
                _unlink(nxt, prv, present, node)
                done += 1
            node = after
        count[p] += m - max(evict, 0)
        total += m - max(evict, 0)
        if excess > non_needed:
            # Every entry is pinned: the earliest-served items are released, one per later miss.
            free_for_misses = capacity[p] - h
            q = 0
            for i in range(a, b):
                if not hit[i]:
                    if q >= free_for_misses:
                        release[i] = q - free_for_misses
                    q += 1
            released = n - capacity[p]
            r = 0
            for i in range(a, b):  # serve order: hits first
                if r < released and hit[i]:
                    _unlink(nxt, prv, present, keys[i])
                    r += 1
            for i in range(a, b):  # then misses
                if r < released and not hit[i]:
                    _unlink(nxt, prv, present, keys[i])
                    r += 1
            count[p] -= released
            total -= released
        if not refresh:
            for i in range(a, b):
                pinned[keys[i]] = False
        if total > peak:
            peak = total
        if clear_after:
            _clear_list(nxt, prv, present, s)
            total -= count[p]
            count[p] = 0
    totals[0] = total
    totals[1] = peak
    return hit, release


@_njit
def _append(nxt, prv, s, key):
    """Link ``key`` at the most recent end of the list whose sentinel is ``s``."""
    last = prv[s]
    nxt[last] = key
    prv[key] = last
    nxt[key] = s
    prv[s] = key


@_njit
def _unlink(nxt, prv, present, key):
    nxt[prv[key]] = nxt[key]
    prv[nxt[key]] = prv[key]
    present[key] = False


@_njit
def _clear_list(nxt, prv, present, s):
    """Empty the list whose sentinel is ``s`` (every key in it leaves the cache)."""
    node = nxt[s]
    while node != s:
        present[node] = False
        node = nxt[node]
    nxt[s] = s
    prv[s] = s


@_njit
def _lru_stream_steps(keys, part, reset, clear_after, refresh, capacity, num_keys):
    """The ``standard`` semantics: every access alone (evict on insert), one LRU list per
    partition ``part[i]``; ``reset[i]`` empties the cache first; ``clear_after`` empties the
    access's partition after it (no-cache); ``refresh``: LRU, else FIFO. Returns hit[access]."""
    num_parts = capacity.shape[0]
    nxt = np.arange(num_keys + num_parts)
    prv = np.arange(num_keys + num_parts)
    present = np.zeros(num_keys, dtype=np.bool_)
    count = np.zeros(num_parts, dtype=np.int64)
    hit = np.zeros(keys.shape[0], dtype=np.bool_)
    for i in range(keys.shape[0]):
        if reset[i]:
            for p in range(num_parts):
                _clear_list(nxt, prv, present, num_keys + p)
                count[p] = 0
        key = keys[i]
        p = part[i]
        s = num_keys + p
        if present[key]:
            hit[i] = True
            if refresh:  # LRU: to the most recent end
                nxt[prv[key]] = nxt[key]
                prv[nxt[key]] = prv[key]
                _append(nxt, prv, s, key)
        else:
            if count[p] >= capacity[p]:
                old = nxt[s]
                nxt[s] = nxt[old]
                prv[nxt[old]] = s
                present[old] = False
            else:
                count[p] += 1
            present[key] = True
            _append(nxt, prv, s, key)
        if clear_after:
            present[key] = False
            nxt[s] = s
            prv[s] = s
            count[p] = 0
    return hit


def _partition_of(groups: AccessGroups, per_layer: bool) -> np.ndarray:
    return groups.layer if per_layer else np.zeros(groups.num_groups, dtype=np.int64)


def run_lru(groups: AccessGroups, *, capacity: np.ndarray, per_layer: bool, reset: np.ndarray,
            clear_after: bool, num_keys: int, initial: np.ndarray | None = None, refresh: bool = True):
    """The LRU kernel on access groups: (hit, release, peak_entries)."""
    init = np.zeros(0, dtype=np.int64) if initial is None else np.asarray(initial, dtype=np.int64)
    if len(init) and per_layer:
        raise ConfigError("initial residents with per-layer partitions are not supported by the fast engine")
    if len(init) > int(capacity.sum()):
        raise ConfigError("more initial residents than cache entries")
    return _lru_kernel(groups.keys, groups.start, _partition_of(groups, per_layer), reset,
                       clear_after, refresh, capacity, num_keys, init)
