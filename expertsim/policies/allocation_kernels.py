"""CrossLayerAllocator's split of cache slots over layers, compiled (numba, or plain Python without
it): the DES's allocator and the fast engine's kernel call the same function, so the two agree to
the bit. The split's weights are summed in numpy's own order (:func:`_numpy_sum`), so the numbers
are those of the first numpy implementation (tests/policies/test_systems.py holds them equal)."""
from __future__ import annotations

import numpy as np

from expertsim.jit import _njit


@_njit
def proportional_split(total, demand, minimum, maximum):
    """:func:`~expertsim.policies.allocation.proportional_slots` (``total`` >= ``minimum`` x
    layers): rounds of an ideal share of the spare slots in proportion to demand + 1e-9 among the
    layers with room, floored, the largest remainders (ties to the lower layer) one more, until
    nothing is left or nothing moves; the weights' sum in numpy's order (:func:`_numpy_sum`)."""
    n = demand.shape[0]
    slots = np.full(n, minimum, dtype=np.int64)
    spare = min(total - minimum * n, (maximum - minimum) * n)
    share = np.zeros(n)
    ideal = np.zeros(n)
    key = np.zeros(n)
    add = np.zeros(n, dtype=np.int64)
    while spare > 0:
        for i in range(n):
            share[i] = np.float64(demand[i]) + 1e-9 if slots[i] < maximum else 0.0
        whole = _numpy_sum(share, 0, n)
        added = 0
        for i in range(n):
            ideal[i] = share[i] / whole * spare
            add[i] = min(np.int64(np.floor(ideal[i])), maximum - slots[i])
            added += add[i]
        left = spare - added
        if left > 0:  # the largest remainders among the layers with room; equal ones by layer
            for i in range(n):
                key[i] = -(ideal[i] - np.floor(ideal[i])) * (1.0 if slots[i] < maximum else 0.0)
            order = np.argsort(key, kind="mergesort")
            for j in range(min(left, n)):
                i = order[j]
                if slots[i] + add[i] < maximum:
                    add[i] += 1
                    added += 1
        if added == 0:
            break
        for i in range(n):
            slots[i] += add[i]
        spare -= added
    return slots


@_njit
def _numpy_sum(a, lo, n):
    """``a[lo:lo + n].sum()`` as numpy adds a contiguous float64 array (pairwise: blocks of up to
    128 summed by :func:`_block_sum`, a longer range split in two halves, the first a multiple of
    8, and the halves' sums added; the same bits, tested). The halving runs on an explicit stack:
    numba's cache does not keep recursive functions safely."""
    if n <= 128:
        return _block_sum(a, lo, n)
    start = np.zeros(64, dtype=np.int64)  # the frames: range, split, state (0 new, 1 left pending, 2 right)
    size = np.zeros(64, dtype=np.int64)
    split = np.zeros(64, dtype=np.int64)
    state = np.zeros(64, dtype=np.int64)
    left = np.zeros(64)
    top, value, back = 0, 0.0, False
    start[0], size[0] = lo, n
    while top >= 0:
        if back:  # a child's sum in value
            if state[top] == 1:
                left[top], state[top], back = value, 2, False
                start[top + 1], size[top + 1], state[top + 1] = start[top] + split[top], size[top] - split[top], 0
                top += 1
            else:
                value = left[top] + value
                top -= 1
            continue
        if size[top] <= 128:
            value, back = _block_sum(a, start[top], size[top]), True
            top -= 1
            continue
        half = size[top] // 2
        split[top], state[top] = half - half % 8, 1
        start[top + 1], size[top + 1], state[top + 1] = start[top], split[top], 0
        top += 1
    return value


@_njit
def _block_sum(a, lo, n):
    """numpy's pairwise sum of at most 128 elements: in order below 8, else eight running sums
    over the multiples of 8, added in pairs, then the rest in order."""
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[lo + i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    while i < n - n % 8:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res
