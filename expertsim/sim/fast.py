"""The fast replay engine: the built-in policies' exact hit/miss sequence and timing, without SimPy.

The reference engines (the SimPy DES and the general cache replay) drive any policy through the
shared :class:`~expertsim.policies.serve.LayerServer`, one Python call per lookup. For the systems
whose decisions are fixed (the base :class:`~expertsim.policies.System` with LRU or FIFO
eviction, ``no-cache`` and ``all-on-gpu``) the same sequence follows from a few arrays:

- *Access groups*: for every (pass, MoE layer), the needed experts in ascending id order (the
  LayerServer's lookup order) and how many of the pass's tokens route to each. Built in one
  compiled pass over the routes (numpy without numba).
- *The cache* (:func:`_lru_steps`): one recency list per cache partition (per layer or one
  global pool) as an intrusive doubly linked list over the keys. A group's misses are appended
  in ascending id order (their lookup ticks; with LRU its hits move there too), then the oldest
  unpinned entries leave until the misses fit. When every entry is pinned (the union of a prefill pass is
  larger than the cache), the earliest-served items are released in serve order, exactly as
  :meth:`LayerServer.serve` does, and the kernel records which item each such copy waits for.
- *Timing* (:func:`_timing_kernel`): at batch 1 with no prefetch, every copy of a layer is
  requested at the layer's start (in serve order), or when the compute of the item whose room it
  reuses ends; the single link serves them first come, first served, which is serve order. The
  compute stream serves hits first, then each miss once its copy has landed. All durations are
  integer nanoseconds from the same :class:`~expertsim.sim.cost.CostModel`, so totals are equal
  to the DES's, not just close.

The kernels are plain Python over numpy arrays, compiled by numba when it is installed (the
``fast`` extra); without numba they run as Python, with the same results, slower.
``supports_cache_replay`` and ``supports_simulation`` refuse anything these kernels do not
reproduce exactly (other policies, subclasses, prefetch, timelines, batching), so callers fall back
to the reference engines.
"""
from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np

from expertsim.errors import ConfigError

try:  # numba is optional: the `fast` extra
    import numba

    HAVE_NUMBA = True
    _njit = numba.njit(cache=True, nogil=True)
except ImportError:  # pragma: no cover - exercised where numba is absent
    HAVE_NUMBA = False

    def _njit(func):
        return func


# --- kernels ----------------------------------------------------------------------------
SMALL_BELADY_ENTRIES = 48  # set-Belady partitions up to this many entries scan instead of keeping a heap
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
def _widest_group(gstart):
    """The largest group (at least 1)."""
    width = 1
    for g in range(gstart.shape[0] - 1):
        width = max(width, gstart[g + 1] - gstart[g])
    return width


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


# --- access groups ----------------------------------------------------------------------
@dataclasses.dataclass
class AccessGroups:
    """The LayerServer's lookups, grouped: group g is one MoE layer of one pass; its needed keys
    (layer * num_experts + expert, ascending) are ``keys[start[g]:start[g+1]]``, ``tokens`` the
    pass's tokens routed to each."""

    keys: np.ndarray  # integer [accesses]
    tokens: np.ndarray  # integer [accesses]
    start: np.ndarray  # int64 [groups + 1]
    layer: np.ndarray  # int64 [groups]
    pass_index: np.ndarray  # int64 [groups]


def _single_token_groups(experts: np.ndarray, num_experts: int):
    """Groups of one-token passes: each top-k sorted, repeats merged (a repeated expert counts
    its uses, as the LayerServer's bincount does). Returns (keys, tokens, counts per group)."""
    n, num_layers, k = experts.shape
    srt = np.sort(experts, axis=2).astype(np.int64)
    keep = np.ones(srt.shape, dtype=bool)
    keep[:, :, 1:] = srt[:, :, 1:] != srt[:, :, :-1]
    tokens = np.ones(srt.shape, dtype=np.int64)
    if not keep.all():
        for j in range(k - 1, 0, -1):
            dup = ~keep[:, :, j]
            run = np.zeros(srt.shape[:2], dtype=np.int64)
            run[dup] = tokens[:, :, j][dup]
            tokens[:, :, j - 1] += run
    srt += (np.arange(num_layers, dtype=np.int64) * num_experts)[None, :, None]
    return srt[keep], tokens[keep], keep.sum(axis=2).ravel()


def _multi_token_groups(experts: np.ndarray, pass_of: np.ndarray, num_passes: int, num_experts: int):
    """Groups of passes over several tokens: the union of their experts with use counts."""
    n, num_layers, k = experts.shape
    code = ((pass_of[:, None, None] * num_layers + np.arange(num_layers)[None, :, None]) * num_experts
            + experts.astype(np.int64)).ravel()
    if num_passes * num_layers * num_experts <= 4 * code.size + 1024:  # dense counts are cheaper
        used = np.bincount(code, minlength=num_passes * num_layers * num_experts)
        uniq = np.flatnonzero(used)
        tok = used[uniq]
    else:
        uniq, tok = np.unique(code, return_counts=True)
    group = uniq // num_experts
    keys = (group % num_layers) * num_experts + uniq % num_experts
    counts = np.bincount(group, minlength=num_passes * num_layers)
    return keys, tok.astype(np.int64), counts


@_njit
def _groups_kernel(experts, pass_starts, num_experts):
    """:func:`groups_from_passes` in one pass over the routes: a one-token pass's top-k sorted in
    place (insertion sort) with repeats merged; a longer pass's experts counted, then emitted in
    ascending id order. Returns (keys, tokens, start)."""
    n, num_layers, k = experts.shape
    num_passes = pass_starts.shape[0] - 1
    keys = np.empty(n * num_layers * k, dtype=np.int32)
    tokens = np.empty(n * num_layers * k, dtype=np.int32)
    start = np.empty(num_passes * num_layers + 1, dtype=np.int64)
    count = np.zeros(num_experts, dtype=np.int64)
    touched = np.empty(num_experts, dtype=np.int64)
    row = np.empty(k, dtype=np.int64)
    pos = 0
    g = 0
    for p in range(num_passes):
        a = pass_starts[p]
        b = pass_starts[p + 1]
        for layer in range(num_layers):
            start[g] = pos
            g += 1
            base = layer * num_experts
            if b - a == 1:  # sort the top-k (a compare-exchange network), merge repeats
                for j in range(k):
                    row[j] = experts[a, layer, j]
                for i in range(k - 1):
                    for j in range(k - 1 - i):
                        x = row[j]
                        y = row[j + 1]
                        row[j] = min(x, y)
                        row[j + 1] = max(x, y)
                prev = -1
                for j in range(k):
                    if row[j] == prev:
                        tokens[pos - 1] += 1
                    else:
                        keys[pos] = base + row[j]
                        tokens[pos] = 1
                        pos += 1
                    prev = row[j]
                continue
            nt = 0
            for t in range(a, b):
                for j in range(k):
                    e = np.int64(experts[t, layer, j])
                    if count[e] == 0:
                        touched[nt] = e
                        nt += 1
                    count[e] += 1
            if nt * 8 >= num_experts:  # dense enough: scan the counts
                for e in range(num_experts):
                    if count[e]:
                        keys[pos] = base + e
                        tokens[pos] = count[e]
                        count[e] = 0
                        pos += 1
            else:
                for e in np.sort(touched[:nt]):
                    keys[pos] = base + e
                    tokens[pos] = count[e]
                    count[e] = 0
                    pos += 1
    start[g] = pos
    return keys[:pos], tokens[:pos], start


def groups_from_passes(experts: np.ndarray, pass_starts: np.ndarray, num_experts: int) -> AccessGroups:
    """Groups for passes ``pass_starts`` (token offsets, with the end) over ``experts``
    [tokens, layers, k], in the engines' order: passes, then layers, then experts ascending.
    With numba one compiled pass (:func:`_groups_kernel`); without it, numpy."""
    n, num_layers, k = experts.shape
    pass_starts = np.asarray(pass_starts, dtype=np.int64)
    num_passes = len(pass_starts) - 1
    layer = np.tile(np.arange(num_layers, dtype=np.int64), num_passes)
    pass_index = np.repeat(np.arange(num_passes, dtype=np.int64), num_layers)
    if HAVE_NUMBA and n:
        keys, tokens, start = _groups_kernel(np.ascontiguousarray(experts), pass_starts, int(num_experts))
        return AccessGroups(keys, tokens, start, layer, pass_index)
    return _groups_numpy(experts, pass_starts, num_experts, layer, pass_index)


def _groups_numpy(experts, pass_starts, num_experts, layer, pass_index) -> AccessGroups:
    """:func:`groups_from_passes` with numpy alone (no numba; also the kernel's reference in tests)."""
    n, num_layers, k = experts.shape
    num_passes = len(pass_starts) - 1
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return AccessGroups(empty, empty, np.zeros(1, dtype=np.int64), layer, pass_index)
    lengths = np.diff(pass_starts)
    single = lengths == 1
    if single.all():
        keys, tokens, counts = _single_token_groups(experts, num_experts)
        start = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=start[1:])
        return AccessGroups(keys, tokens, start, layer, pass_index)
    # One-token passes (decode) sorted per row; longer passes (prefill) by counting.
    parts = []
    single_passes = np.flatnonzero(single)
    if len(single_passes):
        parts.append((single_passes, *_single_token_groups(experts[pass_starts[single_passes]], num_experts)))
    multi_passes = np.flatnonzero(~single)
    rows = np.repeat(np.arange(len(multi_passes), dtype=np.int64), lengths[multi_passes])
    token_rows = np.concatenate([np.arange(pass_starts[p], pass_starts[p + 1]) for p in multi_passes])
    parts.append((multi_passes, *_multi_token_groups(experts[token_rows], rows, len(multi_passes), num_experts)))
    counts = np.zeros(num_passes * num_layers, dtype=np.int64)
    gids = []
    for passes, _, _, c in parts:
        g = (passes[:, None] * num_layers + np.arange(num_layers)[None, :]).ravel()
        counts[g] = c
        gids.append(g)
    start = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=start[1:])
    keys = np.empty(int(start[-1]), dtype=np.int64)
    tokens = np.empty(int(start[-1]), dtype=np.int64)
    for g, (_, k_part, t_part, c) in zip(gids, parts):
        first = np.repeat(start[g], c)
        local = np.arange(len(k_part)) - np.repeat(np.cumsum(c) - c, c)
        keys[first + local] = k_part
        tokens[first + local] = t_part
    return AccessGroups(keys, tokens, start, layer, pass_index)


# --- support checks ---------------------------------------------------------------------
# The System hooks the engines call, and which of them each built-in system may override with
# the behaviour the kernels reproduce. A system whose class overrides any other hook (say, a
# reload of its residents at each request) is left to the reference engines.
_HOOKS = ("prepare", "on_request_start", "select_batch", "on_layer", "on_layer_end", "initial_residents",
          "cache_config")
_OVERRIDES = {"lru": (), "fifo": (), "no-cache": ("cache_config", "on_layer_end"),
              "all-on-gpu": ("cache_config", "initial_residents")}


def _builtin_kind(system) -> str | None:
    """'lru' / 'fifo' (the base System with LRU or FIFO eviction), 'no-cache', 'all-on-gpu', or
    None when the fast engine does not reproduce the system (any other class, subclasses
    included, or a built-in class whose hooks changed)."""
    from expertsim.policies.base import System
    from expertsim.policies.eviction import FIFO, LRU
    from expertsim.policies.systems import AllOnGpu, NoCache

    eviction = type(getattr(system, "eviction", None))
    kind = None
    if type(system) is System and eviction in (LRU, FIFO):
        kind = "lru" if eviction is LRU else "fifo"
    elif type(system) is NoCache and eviction is LRU:
        kind = "no-cache"
    elif type(system) is AllOnGpu and eviction is LRU:
        kind = "all-on-gpu"
    if kind is None:
        return None
    for hook in _HOOKS:
        if hook not in _OVERRIDES[kind] and getattr(type(system), hook) is not getattr(System, hook):
            return None
    return kind


def supports_cache_replay(system, cache_config, semantics: str = "together") -> bool:
    """True when :func:`replay_cache_fast` reproduces the general replay exactly."""
    if semantics not in ("together", "standard"):
        return False
    kind = _builtin_kind(system)
    if kind is None:
        return False
    if cache_config is None:
        return kind in ("no-cache", "all-on-gpu")  # they fix their own size when a model is given
    return True


def _capacity_slots(cache_config, num_layers: int, num_experts: int, expert_bytes: int) -> tuple[np.ndarray, bool]:
    """Entries per partition (every entry is one full-precision expert) and whether the cache is
    partitioned per layer."""
    if cache_config.per_layer is not None:
        return np.full(num_layers, int(cache_config.per_layer), dtype=np.int64), True
    cap = cache_config.capacity_bytes(num_layers, num_experts, expert_bytes)
    return np.array([cap // expert_bytes], dtype=np.int64), False


def _resets(groups_request: np.ndarray, scope: str) -> np.ndarray:
    """True at each group that starts a new request when the cache is emptied per request."""
    reset = np.zeros(len(groups_request), dtype=bool)
    if scope == "request" and len(reset):
        reset[0] = True
        reset[1:] = groups_request[1:] != groups_request[:-1]
    return reset


def _partition_of(groups: AccessGroups, per_layer: bool) -> np.ndarray:
    return groups.layer if per_layer else np.zeros(len(groups.layer), dtype=np.int64)


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


# --- cache replay -----------------------------------------------------------------------
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
        reset = np.zeros(len(groups.layer), dtype=bool)
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


# --- classic stream replay (benchmarks against libCacheSim) --------------------------------
STREAM_POLICIES = {"lru": 0, "fifo": 1, "belady": 2}


def next_use_positions(keys: np.ndarray) -> np.ndarray:
    """next_use[p] = the next position > p with the same key (len(keys) if none)."""
    n = len(keys)
    nxt = np.full(n, n, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    same = keys[order[1:]] == keys[order[:-1]]
    nxt[order[:-1][same]] = order[1:][same]
    return nxt


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


# --- timed simulation ---------------------------------------------------------------------
# SimOptions fields the fast engine reproduces at any value, and the values it reproduces for
# the others; a field not listed here (a new option) must be at its default.
_ANY_VALUE = {"scope", "check_memory", "engine", "bounds", "profile", "link_curve", "prefill_chunk_tokens",
              "timeline_iterations", "seed", "rate_per_s",
              "link_queue",  # the systems it runs copy on demand only: in issue order either way
              "runtime"}  # checked below: host times fold into the cost model, copy semantics do not
_ALLOWED = {"batch": (1,), "arrival": ("closed", "offline"), "timeline": (False,),
            "arrival_times_ns": (None,), "copy_chunk_bytes": (None,)}


def supports_simulation(system, cache_config, options, *, model=None, hardware=None) -> bool:
    """True when :func:`simulate_fast` reproduces the SimPy engine exactly: the base System with
    LRU or FIFO, no-cache or all-on-gpu; batch 1 with closed or offline arrivals (chunked prefill
    allowed); whole-expert copies; no timeline; any cost profile or link curve. With
    ``hardware`` (and ``model``) also checks the link (one copy engine) and that every expert
    lives in host memory (no storage tier reads)."""
    return _builtin_kind(system) is not None and run_supported(system, cache_config, options, model=model,
                                                                hardware=hardware)


def run_supported(system, cache_config, options, *, model=None, hardware=None) -> bool:
    """The run-level half of :func:`supports_simulation` (options, runtime, link, storage),
    shared with the general eviction pass (:mod:`expertsim.sim.fast_general`)."""
    from expertsim.sim.cost import runtime_for

    if not runtime_for(system, options.runtime).fast_engine_ok:
        return False
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if f.name in _ANY_VALUE:
            continue
        if f.name in _ALLOWED:
            if value not in _ALLOWED[f.name]:
                return False
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            return False
        if value != default:
            return False
    if model is not None and cache_config is not None and cache_config.per_layer is not None \
            and cache_config.per_layer < model.top_k:
        return False  # fewer slots than top-k: experts stream through the slots (the DES's serve order)
    if hardware is not None:
        if hardware.link.copy_engines != 1:
            return False
        if model is not None:
            from expertsim.sim.memory import storage_resident_keys

            try:
                if storage_resident_keys(model, hardware).any():
                    return False
            except ConfigError:
                return False
    return True


@dataclasses.dataclass
class _Schedule:
    """Batch-1 iterations as arrays (the ContinuousBatcher's order: requests in trace order, each
    request's passes in order, prefill passes cut into chunks)."""

    start: np.ndarray  # first trace row of each iteration
    stop: np.ndarray
    request: np.ndarray
    phase: np.ndarray  # phase of the iteration's first row
    context: np.ndarray  # KV length after the iteration
    decode_pass: np.ndarray  # the iteration belongs to a decode pass (its tokens' TPOT counts)
    ends_pass: np.ndarray  # last chunk of its pass


def _batch1_schedule(trace, chunk: int | None) -> _Schedule:
    starts = trace.pass_starts()
    a, b = starts[:-1], starts[1:]
    pieces = np.ones(len(a), dtype=np.int64)
    if chunk is not None:
        prefill = trace.phase[a] == 0
        pieces[prefill] = -(-(b[prefill] - a[prefill]) // int(chunk))
    first = np.repeat(a, pieces)
    piece = np.arange(int(pieces.sum())) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    start = first + piece * (int(chunk) if chunk is not None else 0)
    stop = np.repeat(b, pieces)
    if chunk is not None:  # only prefill passes are chunked
        stop = np.where(trace.phase[start] == 0, np.minimum(stop, start + int(chunk)), stop)
    return _Schedule(start=start, stop=stop, request=trace.request[start], phase=trace.phase[start].astype(np.int64),
                     context=trace.position[stop - 1] + 1, decode_pass=np.repeat(trace.phase[a] == 1, pieces),
                     ends_pass=piece == np.repeat(pieces, pieces) - 1)


def _request_records(sched: _Schedule, begin: np.ndarray, end: np.ndarray, arrival: str):
    """The batcher's per-request records and per-token decode latencies at batch 1."""
    change = np.ones(len(sched.request), dtype=bool)
    change[1:] = sched.request[1:] != sched.request[:-1]
    first_it = np.flatnonzero(change)
    last_it = np.append(first_it[1:], len(change)) - 1
    finish = end[last_it]
    if arrival == "closed":
        arrivals = np.concatenate([[0], finish[:-1]])
    else:  # offline: everything queued at 0
        arrivals = np.zeros(len(first_it), dtype=np.int64)
    req_of_it = np.cumsum(change) - 1
    # First token: the end of the request's first pass (its last chunk).
    pass_end_its = np.flatnonzero(sched.ends_pass)
    first_pass_end = np.full(len(first_it), -1, dtype=np.int64)
    first_pass_end[req_of_it[pass_end_its][::-1]] = pass_end_its[::-1]
    dur = end - begin
    ntok = sched.stop - sched.start
    lat_it = np.flatnonzero(sched.decode_pass)
    latencies = np.repeat(dur[lat_it], ntok[lat_it])
    lat_req = np.repeat(req_of_it[lat_it], ntok[lat_it])
    bounds = np.searchsorted(lat_req, np.arange(len(first_it) + 1))
    records = []
    for i in range(len(first_it)):
        mine = latencies[bounds[i]:bounds[i + 1]]
        records.append({"request": int(sched.request[first_it[i]]), "arrival_ns": int(arrivals[i]),
                        "start_ns": int(begin[first_it[i]]), "first_token_ns": int(end[first_pass_end[i]]),
                        "finish_ns": int(finish[i]), "decode_tokens": len(mine),
                        "tpot_ns": float(np.mean(mine)) if len(mine) else float("nan")})
    return records, latencies


class _Background:
    """``fn(*args)`` on a thread of its own; :meth:`result` waits for it (and re-raises)."""

    def __init__(self, fn, *args):
        self._out: dict = {}
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn, args) -> None:
        try:
            self._out["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller by result()
            self._out["error"] = exc

    def result(self):
        self._thread.join()
        if "error" in self._out:
            raise self._out["error"]
        return self._out["value"]


def _belady_misses(model, groups: AccessGroups, cache_config, initial) -> int:
    """Copies Belady's optimal eviction needs for the runs' needed sets (the link bound of
    :func:`expertsim.sim.bounds.run_bounds`), from the access groups."""
    L, E = model.num_moe_layers, model.num_experts
    if cache_config.per_layer is not None:
        parts, slots = L, int(cache_config.per_layer)
    else:
        parts, slots = 1, int(cache_config.capacity_bytes(L, E, model.expert_bytes()) // model.expert_bytes())
    gpart = groups.layer if parts > 1 else np.zeros(len(groups.layer), dtype=np.int64)
    width = int(np.diff(groups.start).max()) if len(groups.layer) else 1
    kernel = _set_belady_small if slots + width <= SMALL_BELADY_ENTRIES else _set_belady_kernel
    return int(kernel(groups.keys, groups.start, gpart, parts, slots, L * E, np.asarray(initial, dtype=np.int64)))


def _bounds_metrics(cost, model, misses: int, *, dense_total_ns: int, expert_total_ns: int, copy_chunk_bytes) -> dict:
    """The bounds' metrics: compute-only = the run's dense plus expert compute (every needed
    expert computed once per layer and pass, which the base systems do); link = Belady's copies."""
    compute_ns = int(dense_total_ns + expert_total_ns)
    link_ns = misses * cost.chunked_wire_ns(model.expert_bytes(), copy_chunk_bytes)
    return {"compute_bound_s": compute_ns / 1e9, "link_bound_s": link_ns / 1e9,
            "bound_s": max(compute_ns, link_ns) / 1e9, "belady_misses": misses,
            "compute_bound_ns": compute_ns, "link_bound_ns": int(link_ns)}


def simulate_fast(model, hardware, system, cache_config, trace, options, *, cache_pass=None):
    """The fast engine's :class:`~expertsim.sim.metrics.RunResult`: the same metrics as
    ``Simulation(model, hardware, system, cache_config, options).run(trace)`` (engine "fast").
    ``cache_pass(setup, trace, groups)``, when given, computes (hit, release, peak_cache_bytes)
    in place of the LRU/FIFO kernels (the caller has checked the run: see
    :mod:`expertsim.sim.fast_general`)."""
    from expertsim.sim.metrics import summarise
    from expertsim.sim.setup import RunSetup

    if cache_pass is None and not supports_simulation(system, cache_config, options, model=model,
                                                      hardware=hardware):
        raise ConfigError(
            f"the fast engine does not support policy {system.label!r} with these options (it runs "
            f"the base system with LRU or FIFO, no-cache and all-on-gpu at batch 1, closed or offline "
            f"arrivals, whole-expert copies on one copy engine, no timeline); use --engine des"
        )
    wall0 = time.perf_counter()
    sim = RunSetup(model, hardware, system, cache_config, options=options)
    m, opts, cost = model, options, sim.cost
    trace.check_model(m)
    memory = sim.memory_check(int(trace.position.max()) + 1 if trace.num_tokens else 1)
    from expertsim.policies.cache import ExpertCache

    ExpertCache(m.num_moe_layers, m.num_experts, m.expert_bytes(), sim.cache_config, system.eviction,
                top_k=m.top_k)  # the same size checks and messages as the DES
    sched = _batch1_schedule(trace, opts.prefill_chunk_tokens)
    num_iters = len(sched.start)
    # The cache: which lookups hit, and which copies wait for a released item's compute.
    kind = _builtin_kind(system)
    num_layers, num_experts, expert_bytes = m.num_moe_layers, m.num_experts, m.expert_bytes()
    capacity, per_layer = _capacity_slots(sim.cache_config, num_layers, num_experts, expert_bytes)
    groups = groups_from_passes(trace.experts, np.append(sched.start, trace.num_tokens), num_experts)
    reset = np.zeros(len(groups.layer), dtype=bool)
    if opts.scope == "request" and num_iters:
        first = np.ones(num_iters, dtype=bool)
        first[1:] = sched.request[1:] != sched.request[:-1]
        reset = first[groups.pass_index] & (groups.layer == 0)
    initial = np.asarray(system.initial_residents(m), dtype=np.int64)
    if kind == "all-on-gpu":
        reset[:] = False  # a reset reloads every expert (ExpertCache.preload): nothing changes
    # The bound's Belady replay needs only the groups: with numba (which releases the GIL) it
    # runs on a second thread while the cache and timing kernels run here.
    belady = _Background(_belady_misses, m, groups, sim.cache_config, initial) if opts.bounds and HAVE_NUMBA else None
    if cache_pass is not None:
        hit, release, peak_bytes = cache_pass(sim, trace, groups)
    else:
        hit, release, peak = run_lru(groups, capacity=capacity, per_layer=per_layer, reset=reset,
                                     clear_after=kind == "no-cache", num_keys=num_layers * num_experts,
                                     initial=initial, refresh=kind != "fifo")
        peak_bytes = int(peak) * expert_bytes
    # Timing: cost tables from the same CostModel, then the kernel.
    expert_ns = np.zeros(int(groups.tokens.max()) + 1 if len(groups.tokens) else 1, dtype=np.int64)
    for t in np.flatnonzero(np.bincount(groups.tokens)).tolist():
        expert_ns[t] = cost.expert_time_ns(t)
    copy_ns = cost.copy_overhead_ns(expert_bytes) + cost.copy_wire_ns(expert_bytes)
    if sim.runtime.serialises_copies:  # copies on the compute stream (runtime copy_stream = "compute")
        layer_ns, stall_it, compute_it, hits_it, all_it = _serial_timing(
            groups.start, hit, groups.tokens, expert_ns, copy_ns, cost.host_expert_ns, num_layers)
    else:
        layer_ns, stall_it, compute_it, hits_it, all_it = _timing_kernel(groups.start, hit, release, groups.tokens,
                                                                         expert_ns, copy_ns, num_layers)
    ntok = sched.stop - sched.start
    span = int(sched.context.max()) + 1 if num_iters else 1
    pairs, inverse = np.unique(ntok * span + sched.context, return_inverse=True)  # (tokens, context) pairs
    dense = cost.dense_layer_times_ns(pairs // span, pairs % span)[inverse.ravel()]
    iter_ns = dense * m.num_layers + layer_ns
    end = np.cumsum(iter_ns)
    begin = end - iter_ns
    decode_cum = np.concatenate([[0], np.cumsum(trace.phase == 1)])
    decode_it = decode_cum[sched.stop] - decode_cum[sched.start]
    columns = {"iteration": np.arange(num_iters, dtype=np.int64), "request": sched.request.astype(np.int64),
               "requests": np.ones(num_iters, dtype=np.int64), "phase": sched.phase, "tokens": ntok,
               "decode_tokens": decode_it, "start_ns": begin, "end_ns": end, "hits": hits_it,
               "misses": all_it - hits_it, "stall_ns": stall_it, "experts": all_it}
    requests, latencies = _request_records(sched, begin, end, opts.arrival)
    max_kv = int(sched.context.max()) if num_iters else 0
    memory["kv_bytes"] = max(memory["kv_bytes"], int(round(m.kv_bytes_per_token_stored * max_kv)))
    copies = int(all_it.sum() - hits_it.sum())
    totals = {"h2d_bytes": copies * expert_bytes, "stall_ns": int(stall_it.sum()), "copies": copies,
              "prefetch_copies": 0, "cancelled_prefetches": 0, "dropped_gate_mass": 0.0,
              "degraded_gate_mass": 0.0, "cpu_experts": 0, "expert_compute_ns": int(compute_it.sum()),
              "dense_compute_ns": int(dense.sum()) * m.num_layers, "cpu_ns": 0, "storage_bytes": 0,
              "idle_ns": 0}
    extra = {}
    if opts.bounds:
        misses = belady.result() if belady is not None else _belady_misses(m, groups, sim.cache_config, initial)
        extra = _bounds_metrics(cost, m, misses, dense_total_ns=totals["dense_compute_ns"],
                                expert_total_ns=totals["expert_compute_ns"], copy_chunk_bytes=opts.copy_chunk_bytes)
    result = summarise(
        model=m, hardware=hardware, system=system, cache_config=sim.cache_config, trace=trace,
        columns=columns, totals=totals, timeline=None, memory=memory,
        cost=cost, scope=opts.scope, peak_cache_bytes=peak_bytes, engine="fast",
        requests=requests, decode_latencies_ns=latencies,
        serving=opts.serving_summary(),
        extra=extra,
    )
    result.metrics["wall_s"] = time.perf_counter() - wall0
    return result


# --- streamed replay of large traces ------------------------------------------------------
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
