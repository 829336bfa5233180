"""The ridge regressions of :class:`~expertsim.policies.predictors.RoutePredictor`: the closed
form fitted in a fixed order of sums (bit-reproducible, unlike a BLAS/LAPACK fit), the sums of
every (source, target) layer pair from a few shared count matrices (the compiled scorer of the
fitted models: :mod:`~expertsim.policies.ridge_scores`).

The features of a pair (see the predictors module) are one-hot blocks (the token's routing at
layers ``first..s``, its expert pair at ``s``, the previous token's routing at two layers, the
known flag) and one dense block (the token-id prior at ``t``). A pair's X^T X and X^T Y are
assembled from blocks that many pairs share (:func:`route_counts`: co-occurrence counts of the
one-hot columns over every layer, exact integers; :func:`prior_sums`: the prior's sums per target
layer, row by row in order) and a pass over the rows for the pair's own expert-pair column
(:func:`pair_gram`). Every entry is the sum over the pair's dense features (what
``RoutePredictor.features`` builds), with the same terms in the same order, so the two give the
same bits (tests/policies/test_ridge.py holds them equal).
"""
from __future__ import annotations

import numpy as np

from expertsim.jit import _njit, _njit_inline, map_threads

SOLVE_IN_ORDER_MAX = 8192  # active features up to which the ridge solve runs in a fixed order (numba)


class RidgeFit:
    """A fitted ridge model as scikit-learn's ``Ridge(alpha)`` holds it after ``fit``
    (``coef_`` [targets, features], ``intercept_``, ``n_features_in_``; ``predict``), made by
    :func:`set_ridge` without importing scikit-learn (1.1 s at the first import, more than a
    whole fast-engine run); :meth:`to_sklearn` gives the ``Ridge`` itself."""

    def __init__(self, alpha: float = 1.0):
        self.alpha = float(alpha)

    def predict(self, X) -> np.ndarray:
        return np.asarray(X) @ self.coef_.T + self.intercept_

    def to_sklearn(self):
        from sklearn.linear_model import Ridge

        model = Ridge(alpha=self.alpha)
        model.coef_, model.intercept_, model.n_features_in_ = self.coef_, self.intercept_, self.n_features_in_
        return model


def set_ridge(model, n: int, sx, sy, G, B, index=None) -> None:
    """Set a scikit-learn ``Ridge(alpha)``'s (or a :class:`RidgeFit`'s) fitted attributes
    (``coef_``, ``intercept_``, ``n_features_in_``) from the sums of ``n`` rows (column sums ``sx``
    of X and ``sy`` of Y, ``G`` = X^T X, ``B`` = X^T Y, float64), so it predicts as fitted: W =
    (Xc^T Xc + alpha I)^-1 Xc^T Yc on the centred data, the objective and the Cholesky solve
    scikit-learn's ``fit`` uses, in float64. A feature never set in training has W = 0 (its block of
    the system is alpha I), so the solve runs on the others. ``index``: the sums cover only the
    feature columns with ``index >= 0``, at those places (:func:`active_columns`); the others are 0.

    Why not ``model.fit``: on this machine it did not give the same bits for the same data (30 of
    90 Mixtral layer pairs differed in the last bits between two fits in one process; LAPACK's
    Cholesky and the BLAS products vary with their buffers), enough to flip a near tie between
    two experts and move a learned-prefetch run by a hit. Here every sum runs in a fixed order
    (:func:`pair_gram`, :func:`_solve_spd`) up to ``SOLVE_IN_ORDER_MAX`` active
    features (Mixtral's largest is ~350, DeepSeek-V2-Lite's ~2,300: 0.3 s on this machine);
    beyond, the solve is LAPACK's (not bit-reproducible)."""
    x_mean, y_mean = sx / n, sy / n
    active = np.flatnonzero(np.diag(G) != 0)
    A = G[np.ix_(active, active)] - n * np.outer(x_mean[active], x_mean[active])  # Xc^T Xc
    A[np.diag_indices_from(A)] += model.alpha
    rhs = B[active] - n * np.outer(x_mean[active], y_mean)  # Xc^T Yc
    if len(active) <= SOLVE_IN_ORDER_MAX:
        w = _solve_spd(np.ascontiguousarray(A), np.ascontiguousarray(rhs))
    else:
        import scipy.linalg

        w = scipy.linalg.solve(A, rhs, assume_a="pos")
    width = G.shape[0] if index is None else index.shape[0]
    placed = np.arange(width) if index is None else np.flatnonzero(index >= 0)  # the columns of G's places
    mean = np.zeros(width)
    mean[placed] = x_mean
    coef = np.zeros((B.shape[1], width))  # [targets, features]
    coef[:, placed[active]] = w.T
    model.coef_ = coef
    model.intercept_ = _intercept(coef, mean, y_mean)  # not a BLAS product: its bits vary
    model.n_features_in_ = width


PANEL = 32  # columns of L factored together before their update of the trailing matrix
RHS_BLOCK = 32  # right-hand sides solved together (a block of Z stays in cache)


@_njit
def _solve_spd(A, B):
    """A^-1 B for a symmetric positive definite A: Cholesky (A = L L^T), then the two
    triangular solves. Every entry is the left-looking textbook sum in index order,
    L[i, j] = (A[i, j] - L[i, 0] L[j, 0] - L[i, 1] L[j, 1] - ...) / L[j, j], computed as
    updates of the trailing matrix, ``PANEL`` columns of L at a time, each entry still taking its
    subtractions in the order of j (the same subtractions of the same products in the same order,
    so the same bits, tested); the loops run along contiguous rows, and a row of the trailing
    matrix takes a whole panel's updates while it is in cache. (Unsigned loop bounds: numba then
    drops its negative-index check, and the inner loops vectorise.)"""
    w = A.shape[0]
    S = A.copy()  # the trailing matrix, its lower triangle updated in place
    Lt = np.zeros((w, w))  # Lt[j, i] = L[i, j]: L's columns as contiguous rows
    for j0 in range(0, w, PANEL):
        j1 = min(j0 + PANEL, w)
        for j in range(j0, j1):  # the panel: its columns, and their updates of each other
            d = np.sqrt(S[j, j])
            Lt[j, j] = d
            for i in range(j + 1, w):
                Lt[j, i] = S[i, j] / d
            for i in range(j + 1, w):  # S[i, m] -= L[i, j] L[m, j] for j < m <= i, m in the panel
                lij = Lt[j, i]
                for m in range(np.uint64(j + 1), np.uint64(min(i + 1, j1))):
                    S[i, m] -= lij * Lt[j, m]
        for i in range(j1, w):  # the rest: S[i, m] for j1 <= m <= i, the panel's j in order
            for j in range(j0, j1):
                lij = Lt[j, i]
                for m in range(np.uint64(j1), np.uint64(i + 1)):
                    S[i, m] -= lij * Lt[j, m]
    e = B.shape[1]
    W = np.zeros((w, e))
    for c0 in range(0, e, RHS_BLOCK):
        nb = min(RHS_BLOCK, e - c0)
        Z = B[:, c0:c0 + nb].copy()  # L Z = B, then L^T W = Z, both in place
        for i in range(w):
            for k in range(i):
                lik = Lt[k, i]
                for c in range(nb):
                    Z[i, c] -= lik * Z[k, c]
            for c in range(nb):
                Z[i, c] = Z[i, c] / Lt[i, i]
        for i in range(w - 1, -1, -1):
            for k in range(i + 1, w):
                lki = Lt[i, k]
                for c in range(nb):
                    Z[i, c] -= lki * Z[k, c]
            for c in range(nb):
                Z[i, c] = Z[i, c] / Lt[i, i]
        W[:, c0:c0 + nb] = Z
    return W


@_njit
def _intercept(coef, x_mean, y_mean):
    """y_mean - coef @ x_mean, each sum in feature order."""
    out = np.zeros(coef.shape[0])
    for e in range(coef.shape[0]):
        acc = 0.0
        for j in range(coef.shape[1]):
            acc += coef[e, j] * x_mean[j]
        out[e] = y_mean[e] - acc
    return out


@_njit
def own_columns(experts, num_experts):
    """[tokens, layers, k]: the one-hot column (layer * experts + expert) of each routed
    expert, -1 for an expert repeated within its layer (its column is 1 once)."""
    n, num_layers, k = experts.shape
    out = np.empty((n, num_layers, k), dtype=np.int64)
    for r in range(n):
        for layer in range(num_layers):
            for j in range(k):
                e = experts[r, layer, j]
                c = layer * num_experts + e
                for jj in range(j):
                    if experts[r, layer, jj] == e:
                        c = -1
                out[r, layer, j] = c
    return out


def route_counts(cols, prev, known, width):
    """Co-occurrence counts of the one-hot routing columns (``width`` = layers x experts) over
    the rows: ``oo`` [width, width], own x own over every row; over the rows whose previous
    token is known, ``vo`` [width, width] the previous token's columns x own, ``vv`` previous x
    previous, ``ko`` own and ``kv`` previous column counts, ``nk`` the rows; ``own`` the own
    column counts over every row. Exact integers (the matrices int32: a count is at most the
    rows; half the memory traffic of int64), so the rows are counted in halves on two threads
    (:func:`~expertsim.jit.map_threads`) and added."""
    n = cols.shape[0]
    cuts = [(0, n // 2), (n // 2, n)] if n >= 2048 else [(0, n)]
    parts = map_threads(lambda cut: _route_counts(cols, prev, known, width, cut[0], cut[1]), cuts)
    out = list(parts[0])
    for part in parts[1:]:
        out = [x + y for x, y in zip(out, part)]
    oo, vo, vv, ko, kv, nk, own = out
    return _mirrored(oo), vo, _mirrored(vv), ko, kv, int(nk), own


@_njit
def _mirrored(half):
    """A symmetric count matrix from one where each unordered pair was counted once, at either
    of its two places: x != y gets half[x, y] + half[y, x] at both."""
    w = half.shape[0]
    out = half.copy()
    for x in range(w):
        for y in range(x + 1, w):
            v = half[x, y] + half[y, x]
            out[x, y] = v
            out[y, x] = v
    return out


@_njit_inline
def _pair_code(experts, r, s, num_experts):
    """The expert-pair column of row ``r`` at layer ``s``: its two lowest expert ids a <= b
    (np.sort's first two), a * experts + b."""
    a = num_experts
    b = num_experts
    for j in range(experts.shape[2]):
        e = experts[r, s, j]
        if e < a:
            b = a
            a = e
        elif e < b:
            b = e
    return a * num_experts + b


@_njit
def _pair_codes(experts, s, num_experts):
    """:func:`_pair_code` of every row at layer ``s``."""
    out = np.empty(experts.shape[0], dtype=np.int64)
    for r in range(experts.shape[0]):
        out[r] = _pair_code(experts, r, s, num_experts)
    return out


@_njit_inline
def _row_columns(cols, r, out):
    """Row ``r``'s one-hot columns (repeats left out) into ``out``; how many."""
    a = 0
    for layer in range(cols.shape[1]):
        for j in range(cols.shape[2]):
            c = cols[r, layer, j]
            if c >= 0:
                out[a] = c
                a += 1
    return a


@_njit
def _route_counts(cols, prev, known, width, lo, hi):
    """:func:`route_counts` over rows ``lo..hi-1``, ``oo`` and ``vv`` with each unordered pair of
    a row's columns counted once (see :func:`_mirrored`)."""
    n, num_layers, k = cols.shape
    oo = np.zeros((width, width), dtype=np.int32)
    vo = np.zeros((width, width), dtype=np.int32)
    vv = np.zeros((width, width), dtype=np.int32)
    ko = np.zeros(width, dtype=np.int64)
    kv = np.zeros(width, dtype=np.int64)
    own = np.zeros(width, dtype=np.int64)
    m = num_layers * k
    mine = np.empty(m, dtype=np.int64)
    theirs = np.empty(m, dtype=np.int64)
    nk = 0
    for r in range(lo, hi):
        a = _row_columns(cols, r, mine)
        for i in range(a):
            ci = mine[i]
            own[ci] += 1
            for j in range(i, a):
                oo[ci, mine[j]] += 1
        if known[r]:
            nk += 1
            b = _row_columns(cols, prev[r], theirs)
            for i in range(a):
                ko[mine[i]] += 1
            for i in range(b):
                vi = theirs[i]
                kv[vi] += 1
                for j in range(a):
                    vo[vi, mine[j]] += 1
                for j in range(i, b):
                    vv[vi, theirs[j]] += 1
    return oo, vo, vv, ko, kv, nk, own


@_njit
def prior_sums(cols, prev, known, prior, own_layers, prev_layer, width):
    """Sums of the prior's columns (``prior`` [rows, experts] float32, taken as float64), row by
    row in order: per own column at layers ``0..own_layers-1`` (``ro`` [width, experts]), per
    previous token's column at the layers where ``prev_layer`` is set (``rv``, over the known
    rows), over the known rows (``rk``), the products of two prior columns (``rr``) and the
    columns (``rs``)."""
    n, num_layers, k = cols.shape
    E = prior.shape[1]
    ro = np.zeros((width, E))
    rv = np.zeros((width, E))
    rk = np.zeros(E)
    rr = np.zeros((E, E))
    rs = np.zeros(E)
    p64 = np.zeros(E)
    for r in range(n):
        for j in range(E):
            p64[j] = np.float64(prior[r, j])
        for j in range(E):
            rs[j] += p64[j]
            for jj in range(j, E):
                rr[j, jj] += p64[j] * p64[jj]
        for layer in range(own_layers):
            for j in range(k):
                c = cols[r, layer, j]
                if c >= 0:
                    for jj in range(E):
                        ro[c, jj] += p64[jj]
        if known[r]:
            for jj in range(E):
                rk[jj] += p64[jj]
            p = prev[r]
            for layer in range(num_layers):
                if prev_layer[layer]:
                    for j in range(k):
                        c = cols[p, layer, j]
                        if c >= 0:
                            for jj in range(E):
                                rv[c, jj] += p64[jj]
    for j in range(E):
        for jj in range(j):
            rr[j, jj] = rr[jj, j]
    return ro, rv, rk, rr, rs


@_njit
def pair_gram(cols, experts, prev, known, prior, first, s, t, pair_at, prev_layers, prev_at, known_at, index,
              counts, sums):
    """X^T X (``G``), X^T Y (``B``) and the column sums of X and Y of one (s, t) pair's features
    (the layout of ``RoutePredictor.features``; Y: the one-hot routing at ``t``), in float64,
    over the columns a row sets (``index``: each feature column's place among them, -1 for one
    no row sets; see :func:`active_columns`), from the shared ``counts``
    (:func:`route_counts`) and ``sums`` (:func:`prior_sums` at ``t``; empty arrays without a
    prior), and one pass over the rows for the expert-pair column at ``s`` (``pair_at`` >= 0)."""
    oo, vo, vv, ko, kv, nk, own = counts
    ro, rv, rk, rr, rs = sums
    n, num_layers, k = cols.shape
    E = oo.shape[0] // num_layers
    na = 0
    for i in range(index.shape[0]):
        if index[i] >= 0:
            na += 1
    G = np.zeros((na, na))
    B = np.zeros((na, E))
    sx = np.zeros(na)
    sy = np.zeros(E)
    n_own = (s + 1 - first) * E
    base = first * E
    kk_ = index[known_at]
    for e in range(E):
        sy[e] = own[t * E + e]
    for i in range(n_own):
        pi = index[i]
        if pi < 0:
            continue
        gi = base + i
        sx[pi] = own[gi]
        for j in range(n_own):
            pj = index[j]
            if pj >= 0:
                G[pi, pj] = oo[gi, base + j]
        for e in range(E):
            B[pi, e] = oo[gi, t * E + e]
        if kk_ >= 0:
            G[pi, kk_] = G[kk_, pi] = ko[gi]
    nv = prev_layers.shape[0]
    for b in range(nv):
        for e in range(E):
            pi = index[prev_at + b * E + e]
            if pi < 0:
                continue
            gi = prev_layers[b] * E + e
            sx[pi] = kv[gi]
            for j in range(n_own):
                pj = index[j]
                if pj >= 0:
                    G[pi, pj] = G[pj, pi] = vo[gi, base + j]
            for b2 in range(nv):
                for e2 in range(E):
                    pj = index[prev_at + b2 * E + e2]
                    if pj >= 0:
                        G[pi, pj] = vv[gi, prev_layers[b2] * E + e2]
            if kk_ >= 0:
                G[pi, kk_] = G[kk_, pi] = kv[gi]
            for e2 in range(E):
                B[pi, e2] = vo[gi, t * E + e2]
    if kk_ >= 0:
        sx[kk_] = nk
        G[kk_, kk_] = nk
        for e in range(E):
            B[kk_, e] = ko[t * E + e]
    n_prior = rs.shape[0]
    for jj in range(n_prior):
        pi = index[known_at + 1 + jj]
        if pi < 0:
            continue
        sx[pi] = rs[jj]
        for j in range(n_own):
            pj = index[j]
            if pj >= 0:
                G[pi, pj] = G[pj, pi] = ro[base + j, jj]
        for b in range(nv):
            for e in range(E):
                pj = index[prev_at + b * E + e]
                if pj >= 0:
                    G[pi, pj] = G[pj, pi] = rv[prev_layers[b] * E + e, jj]
        if kk_ >= 0:
            G[pi, kk_] = G[kk_, pi] = rk[jj]
        for j2 in range(n_prior):
            pj = index[known_at + 1 + j2]
            if pj >= 0:
                G[pi, pj] = rr[jj, j2]
        for e in range(E):
            B[pi, e] = ro[t * E + e, jj]
    if pair_at >= 0:
        lo = 0  # the pair columns' places are lo..hi-1: after every set column before them
        for c in range(pair_at):
            if index[c] >= 0:
                lo += 1
        hi = lo
        for c in range(pair_at, pair_at + E * E):
            if index[c] >= 0:
                hi += 1
        for r in range(n):
            pc = index[pair_at + _pair_code(experts, r, s, E)]
            sx[pc] += 1.0
            G[pc, pc] += 1.0
            for layer in range(first, s + 1):
                for j in range(k):
                    c = cols[r, layer, j]
                    if c >= 0:
                        G[pc, index[c - base]] += 1.0
            if known[r]:
                p = prev[r]
                for b in range(nv):
                    for j in range(k):
                        c = cols[p, prev_layers[b], j]
                        if c >= 0:
                            G[pc, index[prev_at + b * E + c - prev_layers[b] * E]] += 1.0
                G[pc, kk_] += 1.0
            for jj in range(n_prior):
                G[pc, index[known_at + 1 + jj]] += np.float64(prior[r, jj])
            for j in range(k):
                c = cols[r, t, j]
                if c >= 0:
                    B[pc, c - t * E] += 1.0
        for pc in range(lo, hi):
            for j in range(na):
                if j < lo or j >= hi:
                    G[j, pc] = G[pc, j]
    return sx, sy, G, B


def active_columns(cols, experts, prev, known, first, s, pair_at, prev_layers, prev_at, known_at, width, counts,
                   sums) -> np.ndarray:
    """Each feature column's place among the columns some row sets (-1: none does), in column
    order: the own and previous-token columns with a count, the expert pairs present at ``s``,
    the known flag when a row has it, the prior's columns that are not all zero."""
    oo, vo, vv, ko, kv, nk, own = counts
    E = oo.shape[0] // cols.shape[1]
    on = np.zeros(width, dtype=np.bool_)
    n_own = (s + 1 - first) * E
    on[:n_own] = own[first * E:first * E + n_own] > 0
    if pair_at >= 0:
        on[pair_at + _pair_codes(experts, s, E)] = True
    for b, layer in enumerate(prev_layers):
        on[prev_at + b * E:prev_at + (b + 1) * E] = kv[layer * E:(layer + 1) * E] > 0
    on[known_at] = nk > 0
    rr = sums[3]
    if rr.shape[0]:
        on[known_at + 1:known_at + 1 + rr.shape[0]] = np.diag(rr) != 0
    index = np.full(width, -1, dtype=np.int64)
    index[on] = np.arange(int(on.sum()))
    return index
