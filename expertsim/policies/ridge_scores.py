"""The compiled scorer of :class:`~expertsim.policies.predictors.RoutePredictor`'s ridge models.

A token's scores at a (source, target) layer pair are the model's intercept plus the
coefficient rows of its one-hot features (its routing at layers ``first..s``, its expert pair at
``s``, its previous token's routing at ``prev_layers`` and the known flag) plus its token-id
prior row times the prior's rows, summed in that order in float64: the same model as the dense
features' product, each token on its own in a fixed order, so a token's prediction does not
depend on which tokens are asked with it (and the DES, asking one pass at a time, and the fast
engine, asking for the whole trace, get the same bits).

- :func:`ridge_top`: each token's k highest-scoring experts (ties: the lowest id);
- :func:`ridge_unions`: per pass (a range of tokens), the union of its tokens' top-k, what a
  prefetcher asks for. A pass stops scoring once its union holds every expert (a prefill pass
  of a model with few experts gets there after a few tokens): the same set, less work.
"""
from __future__ import annotations

import numpy as np

from expertsim.jit import _njit, _njit_inline
from expertsim.policies.ridge import _pair_code

LANES = 8  # experts scored together in registers (coef's columns padded to a multiple)


def padded_coef(coef: np.ndarray, intercept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A ridge model's coefficients [features, experts] and intercept as float64 with the experts'
    axis padded with zeros to a multiple of ``LANES`` (what the scorer reads)."""
    width, E = coef.shape
    padded = -(-E // LANES) * LANES
    c = np.zeros((width, padded))
    c[:, :E] = coef
    i = np.zeros(padded)
    i[:E] = intercept
    return c, i


@_njit_inline
def _score(tok, code, experts, flat, prev, prev_known, base, lo, hi, s, pair_at, prev_layers, shift, known_at,
           prior_table, coef, intercept, num_experts, rows, sc):
    """Token ``tok``'s scores into ``sc`` (see the module docstring; ``code``: its row of
    ``prior_table``, a table of no columns: no prior; ``rows``: scratch)."""
    kk = experts.shape[2]
    m = 0  # the rows of the token's one-hot features, in the order they are summed
    for q in range(np.uint64(lo), np.uint64(hi)):
        col = flat[tok, q]
        if col >= 0:  # a repeated expert (-1) is one column, counted once
            rows[m] = col - base
            m += 1
    if pair_at >= 0:
        rows[m] = pair_at + _pair_code(experts, tok, s, num_experts)
        m += 1
    if prev_known[tok]:
        p = prev[tok]
        for bl in range(prev_layers.shape[0]):
            at = prev_layers[bl] * kk
            for j in range(kk):
                col = flat[p, at + j]
                if col >= 0:
                    rows[m] = shift[bl] + col
                    m += 1
        rows[m] = known_at
        m += 1
    n_prior = prior_table.shape[1]
    for c in range(0, coef.shape[1], LANES):
        a0 = intercept[c]
        a1 = intercept[c + 1]
        a2 = intercept[c + 2]
        a3 = intercept[c + 3]
        a4 = intercept[c + 4]
        a5 = intercept[c + 5]
        a6 = intercept[c + 6]
        a7 = intercept[c + 7]
        for q in range(m):
            r = rows[q]
            a0 += coef[r, c]
            a1 += coef[r, c + 1]
            a2 += coef[r, c + 2]
            a3 += coef[r, c + 3]
            a4 += coef[r, c + 4]
            a5 += coef[r, c + 5]
            a6 += coef[r, c + 6]
            a7 += coef[r, c + 7]
        for j in range(n_prior):
            v = np.float64(prior_table[code, j])
            r = known_at + 1 + j
            a0 += v * coef[r, c]
            a1 += v * coef[r, c + 1]
            a2 += v * coef[r, c + 2]
            a3 += v * coef[r, c + 3]
            a4 += v * coef[r, c + 4]
            a5 += v * coef[r, c + 5]
            a6 += v * coef[r, c + 6]
            a7 += v * coef[r, c + 7]
        sc[c] = a0
        sc[c + 1] = a1
        sc[c + 2] = a2
        sc[c + 3] = a3
        sc[c + 4] = a4
        sc[c + 5] = a5
        sc[c + 6] = a6
        sc[c + 7] = a7


@_njit_inline
def _best(sc, taken, num_experts):
    """The highest score not yet taken (the lowest id among equals), marked taken."""
    best = -1
    for e in range(num_experts):
        if not taken[e] and (best < 0 or sc[e] > sc[best]):
            best = e
    taken[best] = True
    return best


@_njit_inline
def _shifts(prev_layers, prev_at, num_experts):
    """A previous token's one-hot column at ``prev_layers[b]`` -> its feature row: + shift[b]."""
    shift = np.zeros(prev_layers.shape[0], dtype=np.int64)
    for bl in range(prev_layers.shape[0]):
        shift[bl] = prev_at + bl * num_experts - prev_layers[bl] * num_experts
    return shift


@_njit
def ridge_top(tokens, experts, cols, prev, prev_known, first, s, pair_at, prev_layers, prev_at, known_at,
              prior_table, prior_code, coef, intercept, num_experts, k):
    """[tokens, k]: each token's k highest scores, highest first (ties: lowest id). ``cols``:
    the trace's :func:`~expertsim.policies.ridge.own_columns`; ``prior_code[i]``: token i's row
    of ``prior_table``; ``coef``, ``intercept`` from :func:`padded_coef`."""
    n = tokens.shape[0]
    kk = experts.shape[2]
    out = np.zeros((n, k), dtype=np.int64)
    sc = np.zeros(coef.shape[1], dtype=np.float64)
    taken = np.zeros(num_experts, dtype=np.bool_)
    rows = np.zeros((s + 1 - first + prev_layers.shape[0]) * kk + 2, dtype=np.int64)
    flat = cols.reshape(cols.shape[0], cols.shape[1] * kk)  # a token's columns, layer by layer
    shift = _shifts(prev_layers, prev_at, num_experts)
    for i in range(n):
        code = prior_code[i] if prior_table.shape[1] > 0 else 0
        _score(tokens[i], code, experts, flat, prev, prev_known, first * num_experts, first * kk, (s + 1) * kk, s,
               pair_at, prev_layers, shift, known_at, prior_table, coef, intercept, num_experts, rows, sc)
        taken[:] = False
        for r in range(k):
            out[i, r] = _best(sc, taken, num_experts)
    return out


@_njit
def ridge_unions(tokens, pstart, pstop, experts, cols, prev, prev_known, first, s, pair_at, prev_layers,
                 prev_at, known_at, prior_table, prior_code, coef, intercept, num_experts, k):
    """Per pass (``tokens[pstart[p]:pstop[p]]``), the distinct experts of its tokens'
    :func:`ridge_top` rows, ascending: (count per pass, the experts pass after pass). A pass
    whose union holds every expert scores no further tokens."""
    n_pass = pstart.shape[0]
    kk = experts.shape[2]
    per_pass = np.zeros(n_pass, dtype=np.int64)
    cap = 0
    for p in range(n_pass):
        cap += min((pstop[p] - pstart[p]) * k, num_experts)
    out = np.zeros(cap, dtype=np.int64)
    sc = np.zeros(coef.shape[1], dtype=np.float64)
    taken = np.zeros(num_experts, dtype=np.bool_)
    seen = np.zeros(num_experts, dtype=np.bool_)
    rows = np.zeros((s + 1 - first + prev_layers.shape[0]) * kk + 2, dtype=np.int64)
    flat = cols.reshape(cols.shape[0], cols.shape[1] * kk)
    shift = _shifts(prev_layers, prev_at, num_experts)
    n = 0
    for p in range(n_pass):
        found = 0
        for i in range(pstart[p], pstop[p]):
            code = prior_code[i] if prior_table.shape[1] > 0 else 0
            _score(tokens[i], code, experts, flat, prev, prev_known, first * num_experts, first * kk, (s + 1) * kk, s,
                   pair_at, prev_layers, shift, known_at, prior_table, coef, intercept, num_experts, rows, sc)
            taken[:] = False
            for r in range(k):
                e = _best(sc, taken, num_experts)
                if not seen[e]:
                    seen[e] = True
                    found += 1
            if found == num_experts:
                break
        for e in range(num_experts):
            if seen[e]:
                seen[e] = False
                out[n] = e
                n += 1
        per_pass[p] = found
    return per_pass, out[:n]
