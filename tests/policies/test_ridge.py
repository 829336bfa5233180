"""The ridge predictors' sums assembled from shared counts equal the sums over each pair's dense
features bit for bit, and the compiled scorer ranks as the dense scores do."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from expertsim.jit import _njit
from expertsim.policies.predictors import RoutePredictor, _onehot
from expertsim.policies.ridge import set_ridge
from expertsim.traces.trace import RoutingTrace


def fit_ridge(model, X: np.ndarray, Y: np.ndarray) -> None:
    """The reference fit: scikit-learn's ``Ridge(alpha)`` on the dense features ``X`` and
    targets ``Y`` by its closed form (set_ridge), from the dense sums of :func:`_gram`."""
    sx, sy, G, B = _gram(np.ascontiguousarray(X), np.ascontiguousarray(Y))
    set_ridge(model, X.shape[0], sx, sy, G, B)


@_njit
def _gram(X, Y):
    """The dense reference sums: column sums of X and Y, X^T X and X^T Y, in float64, row by row
    in order over each row's nonzero columns only (what pair_gram's assembled sums must equal)."""
    n, w = X.shape
    e = Y.shape[1]
    sx = np.zeros(w)
    sy = np.zeros(e)
    G = np.zeros((w, w))
    B = np.zeros((w, e))
    nz = np.zeros(w, dtype=np.int64)
    ny = np.zeros(e, dtype=np.int64)
    for r in range(n):
        m = 0
        for c in range(w):
            if X[r, c] != 0:
                nz[m] = c
                m += 1
        my = 0
        for c in range(e):
            if Y[r, c] != 0:
                ny[my] = c
                my += 1
        for a in range(m):
            i = nz[a]
            xi = np.float64(X[r, i])
            sx[i] += xi
            for b in range(a, m):
                G[i, nz[b]] += xi * np.float64(X[r, nz[b]])
            for b in range(my):
                B[i, ny[b]] += xi * np.float64(Y[r, ny[b]])
        for b in range(my):
            sy[ny[b]] += np.float64(Y[r, ny[b]])
    for i in range(w):
        for j in range(i + 1, w):
            G[j, i] = G[i, j]
    return sx, sy, G, B


@st.composite
def traces(draw):
    """Small traces: 1-3 requests of prefill and decode passes, top-1..3 of 2..9 experts (an
    expert may repeat within a layer), with or without token ids."""
    layers = draw(st.integers(1, 5))
    E = draw(st.integers(2, 9))
    k = draw(st.integers(1, min(3, E)))
    request, step, phase = [], [], []
    for r in range(draw(st.integers(1, 3))):
        prompt = draw(st.integers(1, 6))
        decode = draw(st.integers(0, 8))
        request += [r] * (prompt + decode)
        step += [0] * prompt + list(range(1, decode + 1))
        phase += [0] * prompt + [1] * decode
    n = len(request)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    experts = rng.integers(0, E, (n, layers, k))
    position = np.concatenate([np.arange((np.asarray(request) == r).sum()) for r in sorted(set(request))])
    token_id = rng.integers(0, 12, n) if draw(st.booleans()) else None
    return RoutingTrace(experts=experts, request=np.asarray(request), step=np.asarray(step), position=position,
                        phase=np.asarray(phase), num_experts=E, token_id=token_id)


@settings(max_examples=150, deadline=None)
@given(trace=traces(), distances=st.sets(st.integers(1, 3), max_size=3), path=st.booleans(),
       window=st.one_of(st.none(), st.integers(1, 3)))
def test_pair_sums_are_the_dense_features_sums(trace, distances, path, window):
    pred = RoutePredictor(distances=tuple(sorted(distances)), path=path, window=window).fit(trace)
    tokens = np.arange(trace.num_tokens)
    assert set(pred.models) == set(pred.pairs(trace.num_layers))
    for (s, t), model in pred.models.items():
        X = pred.features(trace, tokens, s, t)
        Y = _onehot(trace.experts[:, t], trace.num_experts)
        ref = type(model)(alpha=model.alpha)
        fit_ridge(ref, X, Y)  # from the dense sums of _gram
        assert np.array_equal(model.coef_, ref.coef_), (s, t)
        assert np.array_equal(model.intercept_, ref.intercept_), (s, t)
        # the scorer: the dense scores' top-k (ties: lowest id) wherever the top-k is not a near tie
        k = min(2, trace.num_experts)
        top = pred.predict_top(trace, tokens, s, t, k)
        dense = X.astype(np.float64) @ model.coef_.T + model.intercept_
        order = np.argsort(-dense, axis=1, kind="stable")
        for i in range(len(tokens)):
            sc = np.sort(dense[i])[::-1]
            if k < trace.num_experts and sc[k - 1] - sc[k] < 1e-9:
                continue
            assert set(top[i]) == set(order[i, :k]), (s, t, i)


def test_dense_sums_are_the_features_products():
    """The reference _gram itself: X^T X, X^T Y and the column sums of a small dense matrix."""
    rng = np.random.default_rng(3)
    X = (rng.random((40, 7)) < 0.3).astype(np.float32)
    X[:, 6] = rng.random(40).astype(np.float32)
    Y = (rng.random((40, 3)) < 0.4).astype(np.float32)
    sx, sy, G, B = _gram(X, Y)
    X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
    assert np.allclose(G, X64.T @ X64) and np.allclose(B, X64.T @ Y64)
    assert np.allclose(sx, X64.sum(axis=0)) and np.allclose(sy, Y64.sum(axis=0))


def _textbook_solve(A, B):
    """Left-looking Cholesky and the two triangular solves, every sum in index order."""
    w, e = A.shape[0], B.shape[1]
    L = np.zeros((w, w))
    for j in range(w):
        d = A[j, j]
        for k in range(j):
            d -= L[j, k] * L[j, k]
        L[j, j] = d = np.sqrt(d)
        for i in range(j + 1, w):
            v = A[i, j]
            for k in range(j):
                v -= L[i, k] * L[j, k]
            L[i, j] = v / d
    Z = np.zeros((w, e))
    for i in range(w):
        for c in range(e):
            v = B[i, c]
            for k in range(i):
                v -= L[i, k] * Z[k, c]
            Z[i, c] = v / L[i, i]
    W = np.zeros((w, e))
    for i in range(w - 1, -1, -1):
        for c in range(e):
            v = Z[i, c]
            for k in range(i + 1, w):
                v -= L[k, i] * W[k, c]
            W[i, c] = v / L[i, i]
    return W


@settings(max_examples=60, deadline=None)
@given(w=st.integers(1, 14), e=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_solve_is_the_textbook_sums_bit_for_bit(w, e, seed):
    """_solve_spd's rank-one updates make the same subtractions in the same order as the
    left-looking Cholesky, so the same bits (what makes a fit reproducible)."""
    from expertsim.policies.ridge import _solve_spd

    rng = np.random.default_rng(seed)
    X = rng.random((w + 3, w))
    A = X.T @ X + 0.5 * np.eye(w)
    B = rng.random((w, e))
    A0, B0 = A.copy(), B.copy()
    got = _solve_spd(A, B)
    assert np.array_equal(A, A0) and np.array_equal(B, B0)  # the inputs are left as they were
    assert np.array_equal(got, _textbook_solve(A, B))


def test_a_fit_and_a_plan_on_threads_equal_them_on_one(monkeypatch):
    """The layer pairs fitted and predicted side by side (map_threads) give what one thread gives."""
    import expertsim.jit as jit
    from expertsim.policies.predictors import training_requests

    rng = np.random.default_rng(5)
    n, L, E = 300, 5, 8
    experts = np.stack([rng.choice(E, 2, replace=False) for _ in range(n * L)]).reshape(n, L, 2)
    request = np.repeat(np.arange(6), n // 6)
    step = np.concatenate([np.arange(n // 6)] * 6)
    trace = RoutingTrace(experts=experts, request=request, step=step, position=step.copy(),
                         phase=(step > 0).astype(np.int64), num_experts=E, token_id=rng.integers(0, 40, n))
    tokens = np.arange(n)

    def fit_and_predict():
        pred = RoutePredictor(distances=(1, 2, 3)).fit(training_requests(trace, 0.5))
        models = {p: (m.coef_.tobytes(), m.intercept_.tobytes()) for p, m in pred.models.items()}
        tops = jit.map_threads(lambda p: pred.predict_top(trace, tokens, p[0], p[1], 2).tobytes(), list(pred.models))
        return models, tops

    monkeypatch.setattr(jit, "_cpus", lambda: 1)
    one = fit_and_predict()
    monkeypatch.setattr(jit, "_cpus", lambda: 4)
    assert fit_and_predict() == one
    assert jit.map_threads(lambda x: x * x, range(7)) == [x * x for x in range(7)]


def test_counts_in_halves_equal_the_counts_of_every_row():
    """route_counts adds two halves' counts (threads) and mirrors the pairs counted once: the
    same matrices as counting every ordered pair of every row."""
    from expertsim.policies.ridge import own_columns, route_counts

    rng = np.random.default_rng(11)
    n, L, E, k = 2500, 3, 6, 2
    experts = rng.integers(0, E, (n, L, k))
    cols = own_columns(experts, E)
    prev = np.maximum(np.arange(n) - 1, 0)
    known = rng.random(n) < 0.8
    oo, vo, vv, ko, kv, nk, own = route_counts(cols, prev, known, L * E)
    hot = np.zeros((n, L * E), dtype=np.int64)  # each row's one-hot columns
    for r in range(n):
        hot[r, cols[r][cols[r] >= 0]] = 1
    them = hot[prev] * known[:, None]
    assert np.array_equal(oo, hot.T @ hot) and np.array_equal(own, hot.sum(axis=0))
    assert np.array_equal(vo, them.T @ hot) and np.array_equal(vv, them.T @ them)
    assert np.array_equal(ko, hot[known].sum(axis=0)) and np.array_equal(kv, them.sum(axis=0))
    assert nk == known.sum()
