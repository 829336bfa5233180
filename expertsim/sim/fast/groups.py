"""Access groups: which experts each (pass, MoE layer) needs, as flat arrays, and the cache's
partitions (entries per partition, the resets of a request-scoped cache).

Group g is one MoE layer of one pass; its needed keys (``layer * num_experts + expert``) in
ascending id order, the LayerServer's lookup order, with the number of the pass's tokens routed
to each. :func:`groups_from_passes` builds them in one compiled pass over the routes (numpy
without numba); every kernel of the fast engine replays them.
"""
from __future__ import annotations

import numpy as np

from expertsim.sim.fast.jit import HAVE_NUMBA, _njit


class AccessGroups:
    """The LayerServer's lookups, grouped: group g is one MoE layer of one pass; its needed keys
    (layer * num_experts + expert, ascending) are ``keys[start[g]:start[g+1]]``, ``tokens`` the
    pass's tokens routed to each. ``layer`` and ``pass_index`` (int64 per group) are given, or,
    for groups of every layer of every pass (``num_layers``), made when first read (a run that
    never reads them, all-on-gpu's, does not allocate them)."""

    def __init__(self, keys: np.ndarray, tokens: np.ndarray, start: np.ndarray, layer: np.ndarray | None = None,
                 pass_index: np.ndarray | None = None, *, num_layers: int | None = None):
        if (layer is None or pass_index is None) and num_layers is None:
            raise ValueError("AccessGroups needs layer and pass_index, or num_layers")
        self.keys, self.tokens, self.start = keys, tokens, start  # integer [accesses]; int64 [groups + 1]
        self._layer, self._pass_index, self._num_layers = layer, pass_index, num_layers

    @property
    def num_groups(self) -> int:
        return len(self.start) - 1

    @property
    def layer(self) -> np.ndarray:
        if self._layer is None:
            L = self._num_layers
            self._layer = np.tile(np.arange(L, dtype=np.int64), self.num_groups // max(L, 1))
        return self._layer

    @property
    def pass_index(self) -> np.ndarray:
        if self._pass_index is None:
            L = self._num_layers
            self._pass_index = np.repeat(np.arange(self.num_groups // max(L, 1), dtype=np.int64), L)
        return self._pass_index


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
    if HAVE_NUMBA and n:
        keys, tokens, start = _groups_kernel(np.ascontiguousarray(experts), pass_starts, int(num_experts))
        return AccessGroups(keys, tokens, start, num_layers=num_layers)
    return _groups_numpy(experts, pass_starts, num_experts)


def _groups_numpy(experts, pass_starts, num_experts) -> AccessGroups:
    """:func:`groups_from_passes` with numpy alone (no numba; also the kernel's reference in tests)."""
    n, num_layers, k = experts.shape
    num_passes = len(pass_starts) - 1
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return AccessGroups(empty, empty, np.zeros(num_passes * num_layers + 1, dtype=np.int64),
                            num_layers=num_layers)
    lengths = np.diff(pass_starts)
    single = lengths == 1
    if single.all():
        keys, tokens, counts = _single_token_groups(experts, num_experts)
        start = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=start[1:])
        return AccessGroups(keys, tokens, start, num_layers=num_layers)
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
    return AccessGroups(keys, tokens, start, num_layers=num_layers)


@_njit
def _widest_group(gstart):
    """The largest group (at least 1)."""
    width = 1
    for g in range(gstart.shape[0] - 1):
        width = max(width, gstart[g + 1] - gstart[g])
    return width


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
