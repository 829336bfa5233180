"""Learned expert predictors (scikit-learn), trained on a training split of a routing trace.

For a source layer ``s`` (where the token is now; ``s = -1``: before the first MoE layer) and a
target layer ``t > s`` one multi-label model scores every expert of layer ``t`` from features a
policy may know at layer ``s``:

- the token's routing at layers ``s-window+1 .. s`` (one-hot per layer; ``window=None``: every
  earlier layer, the default), and the unordered expert
  set at ``s`` as one category (when ``experts**2 <= 4096``);
- the previous token's routing (same request) at layers ``t`` and ``s``, when that token ran in an
  earlier pass (in a prefill pass it is computed alongside, so unknown);
- the token id, through a smoothed training-set prior of its experts at layer ``t``
  (target encoding; absent when the trace has no token ids).

Targets: the experts the token uses at layer ``t`` (multi-hot). A policy prefetches the top-k
scores. Models: ``ridge`` (default: one least-squares solve for all experts of a layer, a few
milliseconds each) or ``logistic`` (one-vs-rest logistic regression, slower).
:meth:`RoutePredictor.evaluate` reports precision and recall on held-out requests.
"""
from __future__ import annotations

import time

import numpy as np

from expertsim.errors import PolicyError
from expertsim.jit import _njit


def training_requests(trace, fraction: float):
    """The first ``fraction`` of the trace's requests (at least one): the split a policy trains
    on when it is not given a predictor; results on these requests are in-sample."""
    if not 0 < fraction <= 1:
        raise PolicyError(f"train fraction must be in (0, 1], got {fraction!r}")
    starts = trace.request_starts()
    n = len(starts) - 1
    take = max(1, int(round(fraction * n)))
    return trace.select(np.arange(int(starts[min(take, n)])))


_BLAS = None  # threadpoolctl's controller, found once (finding the libraries costs ~0.1 ms)


def _one_blas_thread():
    """A context in which BLAS runs on one thread."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


def _onehot(experts: np.ndarray, num_experts: int) -> np.ndarray:
    out = np.zeros((experts.shape[0], num_experts), dtype=np.float32)
    np.put_along_axis(out, experts.astype(np.int64), 1.0, axis=1)
    return out


class _TraceIndex:
    """Per-trace arrays the features need: each token's previous token in its request, and
    whether that token ran in an earlier pass."""

    def __init__(self, trace):
        n = trace.num_tokens
        prev = np.arange(n) - 1
        first = np.ones(n, dtype=bool)
        first[1:] = trace.request[1:] != trace.request[:-1]
        prev[first] = -1
        known = prev >= 0
        known[known] = trace.step[prev[known]] != trace.step[known.nonzero()[0]]
        self.prev = np.maximum(prev, 0)
        self.prev_known = known


class RoutePredictor:
    """Per (source, target) layer multi-label expert predictors (see the module docstring).
    ``distances``: the target offsets ``t - s`` to train for every source layer; ``path``: also
    train ``s = -1`` for every target (ExpertFlow's whole-path prediction)."""

    def __init__(self, distances: tuple[int, ...] = (1,), path: bool = False, window: int | None = None,
                 model: str = "ridge", alpha: float = 1.0, prior_smoothing: float = 5.0, seed: int = 0,
                 only: tuple[tuple[int, int], ...] | None = None):
        if model not in ("ridge", "logistic"):
            raise PolicyError(f"predictor model must be 'ridge' or 'logistic', got {model!r}")
        if any(int(d) < 1 for d in distances):
            raise PolicyError(f"predictor distances must be >= 1, got {distances!r}")
        self.distances = tuple(int(d) for d in distances)
        # the (source, target) pairs to train, when a policy asks for no others (None: every pair)
        self.only = None if only is None else frozenset((int(a), int(b)) for a, b in only)
        self.path = bool(path)
        self.window = None if window is None else int(window)
        self.model = model
        self.alpha = float(alpha)
        self.prior_smoothing = float(prior_smoothing)
        self.seed = int(seed)
        self.models: dict[tuple[int, int], object] = {}
        self.fit_s = 0.0
        self._index: tuple[object, _TraceIndex] | None = None
        self._layouts: dict = {}  # (s, t, pair, prior) -> the features' column layout
        self._one = None  # (trace, token, rows): the last token _features_one read
        self._coef: dict = {}  # (s, t) -> a ridge model's (coef [width, E] float64, intercept)

    def __repr__(self) -> str:
        return (f"RoutePredictor(distances={self.distances}, path={self.path}, window={self.window}, "
                f"model={self.model!r})")

    @property
    def max_distance(self) -> int:
        return max(self.distances) if self.distances else 0

    # --- features ------------------------------------------------------------------------
    def _trace_index(self, trace) -> _TraceIndex:
        # Keyed by the trace object itself (not its id, which a new trace may reuse).
        if self._index is None or self._index[0] is not trace:
            self._index = (trace, _TraceIndex(trace))
        return self._index[1]

    def features(self, trace, tokens: np.ndarray, s: int, t: int) -> np.ndarray:
        """The feature matrix [tokens, columns] (float32), column blocks in this order: one-hot
        routing at layers ``first..s``, the unordered expert pair at ``s``, the previous token's
        one-hot routing at the layers below, whether the previous token is known, the token-id
        prior. The one-hot blocks are filled by index in one matrix."""
        E = self._E
        tokens = np.asarray(tokens)
        n = len(tokens)
        if n == 1:  # a decode token: the same matrix from Python ints (numpy's per-call cost dominates)
            return self._features_one(trace, int(tokens[0]), s, t)
        first = 0 if self.window is None else max(0, s - self.window + 1)
        own = s + 1 - first  # one-hot blocks of the token's own routing
        use_pair = s >= 0 and E * E <= 4096 and trace.top_k > 1
        prev_layers = sorted({t, s} if s >= 0 else {t, max(t - 1, 0)})
        use_prior = self._priors is not None and trace.token_id is not None
        pair_at = own * E
        prev_at = pair_at + (E * E if use_pair else 0)
        known_at = prev_at + len(prev_layers) * E
        width = known_at + 1 + (E if use_prior else 0)
        X = np.zeros((n, width), dtype=np.float32)
        rows = np.arange(n)[:, None]
        if own > 0:
            routes = trace.experts[tokens, first:s + 1].astype(np.int64)  # [n, own, k]
            X[rows, (routes + (np.arange(own) * E)[None, :, None]).reshape(n, -1)] = 1.0
        if use_pair:
            ex = np.sort(trace.experts[tokens, s].astype(np.int64), axis=1)
            X[np.arange(n), pair_at + ex[:, 0] * E + ex[:, 1]] = 1.0
        idx = self._trace_index(trace)
        prev, known = idx.prev[tokens], idx.prev_known[tokens]
        if known.any():
            kp = prev[known]
            routes = trace.experts[kp][:, prev_layers].astype(np.int64)  # [known, blocks, k]
            cols = routes + (prev_at + np.arange(len(prev_layers)) * E)[None, :, None]
            X[np.flatnonzero(known)[:, None], cols.reshape(len(kp), -1)] = 1.0
        X[:, known_at] = known
        if use_prior:
            X[:, known_at + 1:] = self._token_prior(trace.token_id[tokens], t)
        return X

    def _layout(self, trace, s: int, t: int) -> tuple:
        """The column layout of :meth:`features` for (s, t): (first, pair_at or -1, prev_layers,
        prev_at, known_at, width, use_prior)."""
        key = (s, t, trace.top_k > 1, self._priors is not None and trace.token_id is not None)
        layout = self._layouts.get(key)
        if layout is None:
            E = self._E
            first = 0 if self.window is None else max(0, s - self.window + 1)
            own = s + 1 - first
            use_pair = s >= 0 and E * E <= 4096 and key[2]
            prev_layers = sorted({t, s} if s >= 0 else {t, max(t - 1, 0)})
            pair_at = own * E
            prev_at = pair_at + (E * E if use_pair else 0)
            known_at = prev_at + len(prev_layers) * E
            width = known_at + 1 + (E if key[3] else 0)
            layout = (first, pair_at if use_pair else -1, prev_layers, prev_at, known_at, width, key[3])
            self._layouts[key] = layout
        return layout

    def _token_rows(self, trace, token: int) -> tuple:
        """One token's routing as Python lists (its layers' experts; its previous token's, or
        None when unknown; its one-hot columns over every layer) and its token-id prior at every
        layer (None without one), kept for the token last asked about (a pass asks at every
        layer)."""
        one = self._one
        if one is not None and one[0] is trace and one[1] == token:
            return one[2]
        idx = self._trace_index(trace)
        rows = trace.experts[token].tolist()
        prev = trace.experts[int(idx.prev[token])].tolist() if idx.prev_known[token] else None
        E = self._E
        own = np.zeros(len(rows) * E, dtype=np.float32)  # one-hot over every layer (window None: a prefix)
        own[[b * E + e for b, layer in enumerate(rows) for e in layer]] = 1.0
        prior = None
        if self._priors is not None and trace.token_id is not None:
            vocab, counts, sums, base = self._priors
            tid = trace.token_id[token]
            p = min(int(np.searchsorted(vocab, tid)), len(vocab) - 1)
            m = self.prior_smoothing
            # every layer's row of _token_prior at once (element by element the same arithmetic)
            if vocab[p] == tid:
                prior = ((sums[p] + m * base) / (counts[p] + m)).astype(np.float32)
            else:
                prior = ((0.0 + m * base) / (0.0 + m)).astype(np.float32)
        self._one = (trace, token, (rows, prev, own, prior))
        return self._one[2]

    def _features_one(self, trace, token: int, s: int, t: int) -> np.ndarray:
        """:meth:`features` of one token (the same [1, width] float32 matrix, tested equal)."""
        E = self._E
        first, pair_at, prev_layers, prev_at, known_at, width, use_prior = self._layout(trace, s, t)
        rows, prev, own, prior = self._token_rows(trace, token)
        X = np.zeros((1, width), dtype=np.float32)
        row = X[0]
        if first == 0:
            row[:(s + 1) * E] = own[:(s + 1) * E]
        else:
            row[[b * E + e for b, layer in enumerate(range(first, s + 1)) for e in rows[layer]]] = 1.0
        if pair_at >= 0:
            ex = sorted(rows[s])
            row[pair_at + ex[0] * E + ex[1]] = 1.0
        if prev is not None:
            for b, layer in enumerate(prev_layers):
                for e in prev[layer]:
                    row[prev_at + b * E + e] = 1.0
            row[known_at] = 1.0
        if use_prior:
            row[known_at + 1:] = prior[t]
        return X

    def _token_prior(self, token_ids: np.ndarray, t: int) -> np.ndarray:
        vocab, counts, sums, base = self._priors
        pos = np.searchsorted(vocab, token_ids)
        pos = np.minimum(pos, len(vocab) - 1)
        found = vocab[pos] == token_ids
        m = self.prior_smoothing
        n = np.where(found, counts[pos], 0.0)[:, None]
        s = np.where(found[:, None], sums[pos, t], 0.0)
        return ((s + m * base[t]) / (n + m)).astype(np.float32)

    # --- training ------------------------------------------------------------------------
    def pairs(self, num_layers: int) -> list[tuple[int, int]]:
        out = [(s, s + d) for s in range(num_layers) for d in self.distances if s + d < num_layers]
        if self.path:
            out += [(-1, t) for t in range(num_layers)]
        return out if self.only is None else [p for p in out if p in self.only]

    def _new_model(self):
        if self.model == "ridge":
            from sklearn.linear_model import Ridge

            return Ridge(alpha=self.alpha)
        from sklearn.linear_model import LogisticRegression
        from sklearn.multiclass import OneVsRestClassifier

        return OneVsRestClassifier(LogisticRegression(max_iter=200, random_state=self.seed))

    def fit(self, trace) -> "RoutePredictor":
        t0 = time.perf_counter()
        if trace.num_tokens == 0:
            raise PolicyError("cannot train a route predictor on an empty trace")
        self._E, self._L = trace.num_experts, trace.num_layers
        self._priors = None
        self._layouts, self._one, self._coef = {}, None, {}
        if trace.token_id is not None:
            vocab, inverse = np.unique(trace.token_id, return_inverse=True)
            counts = np.bincount(inverse, minlength=len(vocab)).astype(np.float64)
            sums = np.zeros((len(vocab), self._L, self._E), dtype=np.float64)
            for layer in range(self._L):
                for j in range(trace.top_k):
                    np.add.at(sums, (inverse, layer, trace.experts[:, layer, j].astype(np.int64)), 1.0)
            base = sums.sum(axis=0) / trace.num_tokens
            self._priors = (vocab, counts, sums, base)
        tokens = np.arange(trace.num_tokens)
        self.models = {}
        from threadpoolctl import threadpool_limits

        # Small dense solves: one BLAS thread is faster than many (and kinder to a shared machine).
        with threadpool_limits(1):
            self._fit_pairs(trace, tokens)
        self.fit_s = time.perf_counter() - t0
        return self

    def _fit_pairs(self, trace, tokens) -> None:
        for s, t in self.pairs(self._L):
            X = self.features(trace, tokens, s, t)
            Y = _onehot(trace.experts[:, t], self._E)
            constant = Y.min(axis=0) == Y.max(axis=0)
            if self.model == "logistic" and constant.any():
                # an expert never (or always) chosen in training: a fixed score, no classifier
                self.models[(s, t)] = ("constant", Y.mean(axis=0))
                continue
            model = self._new_model()
            if self.model == "ridge":
                _fit_ridge(model, X, Y)
            else:
                model.fit(X, Y)
            self.models[(s, t)] = model

    # --- inference -----------------------------------------------------------------------
    def scores(self, trace, tokens: np.ndarray, s: int, t: int) -> np.ndarray:
        if (s, t) not in self.models:
            raise PolicyError(
                f"no predictor from layer {s} to layer {t}: trained distances {self.distances}, "
                f"path={self.path}"
            )
        model = self.models[(s, t)]
        tokens = np.asarray(tokens)
        if isinstance(model, tuple):
            return np.tile(model[1], (len(tokens), 1))
        X = self.features(trace, tokens, s, t)
        if len(tokens) == 1:
            return self._product(model, X)
        # Several tokens (a prefill pass): one BLAS thread, as in fit. A threaded product's last
        # float32 bit depends on the thread count (so a run's predictions would depend on the
        # machine), and on a busy machine the threads' hand-offs cost more than the product.
        with _one_blas_thread():
            return self._product(model, X)

    def _product(self, model, X: np.ndarray) -> np.ndarray:
        if self.model == "logistic":
            return model.predict_proba(X)
        # Ridge's decision function (X @ coef_.T + intercept_, the product predict computes)
        # without scikit-learn's per-call input validation, which costs more than the product
        # for the one token a decode step predicts for (tested against model.predict; the two
        # can differ in the last float32 bit, as BLAS results do with the arrays' alignment).
        return X @ model.coef_.T + model.intercept_

    def predict_top(self, trace, tokens: np.ndarray, s: int, t: int, k: int) -> np.ndarray:
        """[tokens, k] experts with the highest scores (ties: lowest id). A ridge model's scores
        are summed over the token's nonzero features only (:func:`_ridge_top`: the same model,
        each token on its own, in a fixed order, so a token's prediction does not depend on which
        tokens are asked with it)."""
        model = self.models.get((s, t))
        if self.model == "ridge" and model is not None and not isinstance(model, tuple):
            return self._ridge_top(trace, np.asarray(tokens, dtype=np.int64), s, t, k, model)
        sc = self.scores(trace, tokens, s, t)
        return np.argsort(-sc, axis=1, kind="stable")[:, :k]  # stable: equal scores keep id order

    def _ridge_top(self, trace, tokens, s, t, k, model) -> np.ndarray:
        E = self._E
        first, pair_at, prev_layers, prev_at, known_at, width, use_prior = self._layout(trace, s, t)
        idx = self._trace_index(trace)
        cached = self._coef.get((s, t))
        if cached is None:  # coef [width, E] float64, rows contiguous; intercept [E]
            cached = self._coef[(s, t)] = (np.ascontiguousarray(np.asarray(model.coef_, dtype=np.float64).T),
                                           np.asarray(model.intercept_, dtype=np.float64).ravel())
        coef, intercept = cached
        prior = self._token_prior(trace.token_id[tokens], t) if use_prior else \
            np.zeros((len(tokens), 0), dtype=np.float32)
        return _ridge_top(tokens, np.asarray(trace.experts), idx.prev, idx.prev_known, first, s, pair_at,
                          np.asarray(prev_layers, dtype=np.int64), prev_at, known_at, prior, coef, intercept, E, k)

    def predict_union(self, trace, tokens: np.ndarray, s: int, t: int, k: int) -> list[int]:
        """The experts of :meth:`predict_top` over all ``tokens`` (ascending, each once)."""
        return np.unique(self.predict_top(trace, tokens, s, t, k)).tolist()

    def evaluate(self, trace, *, distance: int = 1, phase: str = "decode", k: int | None = None,
                 threshold: float = 0.5) -> dict:
        """Precision and recall on ``trace`` (held-out requests) of the next-``distance``-layer
        prediction (``distance=0``: the path predictor, from before layer 0): top-k (the
        prefetch set; with k = top-k precision equals recall) and thresholded scores."""
        view = trace.only_phase(phase)
        k = k or view.top_k
        tokens = np.arange(view.num_tokens)
        hit_k = tp = fp = fn = 0
        per_layer = []
        pairs = [(-1, t) for t in range(view.num_layers)] if distance == 0 else \
            [(s, s + distance) for s in range(view.num_layers - distance)]
        for s, t in pairs:
            sc = self.scores(view, tokens, s, t)
            truth = _onehot(view.experts[:, t], self._E).astype(bool)
            top = self.predict_top(view, tokens, s, t, k)
            hits = np.take_along_axis(truth, top, axis=1).sum()
            hit_k += hits
            per_layer.append(float(hits / (len(tokens) * k)))
            pred = sc >= threshold
            tp += int((pred & truth).sum())
            fp += int((pred & ~truth).sum())
            fn += int((~pred & truth).sum())
        n_pred = len(tokens) * k * len(pairs)
        n_true = int(view.num_tokens * view.top_k * len(pairs))
        return {
            "distance": distance, "phase": phase, "tokens": int(view.num_tokens), "k": k,
            "precision_at_k": hit_k / n_pred if n_pred else float("nan"),
            "recall_at_k": hit_k / n_true if n_true else float("nan"),
            "precision_thresholded": tp / (tp + fp) if tp + fp else float("nan"),
            "recall_thresholded": tp / (tp + fn) if tp + fn else float("nan"),
            "threshold": threshold, "per_layer_precision_at_k": per_layer, "fit_s": self.fit_s,
        }


SOLVE_IN_ORDER_MAX = 2048  # active features up to which the ridge solve runs in a fixed order (numba)


def _fit_ridge(model, X: np.ndarray, Y: np.ndarray) -> None:
    """Fit scikit-learn's ``Ridge(alpha)`` (with an intercept) by its closed form and set the
    estimator's fitted attributes (``coef_``, ``intercept_``, ``n_features_in_``), so it predicts
    as fitted: W = (Xc^T Xc + alpha I)^-1 Xc^T Yc on the centred data, the objective and the
    Cholesky solve scikit-learn's ``fit`` uses, in float64. A feature never set in training has
    W = 0 (its block of the system is alpha I), so the solve runs on the others.

    Why not ``model.fit``: on this machine it did not give the same bits for the same data (30 of
    90 Mixtral layer pairs differed in the last bits between two fits in one process; LAPACK's
    Cholesky and the BLAS products vary with their buffers), enough to flip a near tie between
    two experts and move a learned-prefetch run by a hit. Here every sum runs in a fixed order
    (:func:`_gram`, :func:`_solve_spd`) up to ``SOLVE_IN_ORDER_MAX`` active features (Mixtral's
    largest is ~350); beyond, the solve is LAPACK's (fast, not bit-reproducible)."""
    n = X.shape[0]
    sx, sy, G, B = _gram(np.ascontiguousarray(X), np.ascontiguousarray(Y))
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
    coef = np.zeros((Y.shape[1], X.shape[1]))  # [targets, features]
    coef[:, active] = w.T
    model.coef_ = coef
    model.intercept_ = _intercept(coef, x_mean, y_mean)  # not a BLAS product: its bits vary
    model.n_features_in_ = X.shape[1]


@_njit
def _solve_spd(A, B):
    """A^-1 B for a symmetric positive definite A: Cholesky (A = L L^T), then the two
    triangular solves, every sum in index order."""
    w = A.shape[0]
    L = np.zeros((w, w))
    for j in range(w):
        d = A[j, j]
        for k in range(j):
            d -= L[j, k] * L[j, k]
        d = np.sqrt(d)
        L[j, j] = d
        for i in range(j + 1, w):
            v = A[i, j]
            for k in range(j):
                v -= L[i, k] * L[j, k]
            L[i, j] = v / d
    e = B.shape[1]
    Z = np.zeros((w, e))
    for i in range(w):  # L Z = B
        for c in range(e):
            v = B[i, c]
            for k in range(i):
                v -= L[i, k] * Z[k, c]
            Z[i, c] = v / L[i, i]
    W = np.zeros((w, e))
    for i in range(w - 1, -1, -1):  # L^T W = Z
        for c in range(e):
            v = Z[i, c]
            for k in range(i + 1, w):
                v -= L[k, i] * W[k, c]
            W[i, c] = v / L[i, i]
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
def _gram(X, Y):
    """Column sums of X and Y, X^T X and X^T Y, in float64, row by row in order over each row's
    nonzero columns only (the features are mostly one-hot)."""
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


@_njit
def _ridge_top(tokens, experts, prev, prev_known, first, s, pair_at, prev_layers, prev_at, known_at, prior, coef,
               intercept, num_experts, k):
    """RoutePredictor.predict_top for a ridge model: each token's scores, intercept plus the
    coefficient rows of its one-hot features (its routing at layers first..s, its expert pair
    at s, its previous token's routing at ``prev_layers`` and the known flag) plus its prior
    row times the prior's rows, summed in that order in float64; then the k highest (ties:
    lowest id)."""
    n = tokens.shape[0]
    kk = experts.shape[2]
    out = np.zeros((n, k), dtype=np.int64)
    sc = np.zeros(num_experts, dtype=np.float64)
    taken = np.zeros(num_experts, dtype=np.bool_)
    for i in range(n):
        tok = tokens[i]
        for c in range(num_experts):
            sc[c] = intercept[c]
        for layer in range(first, s + 1):
            for j in range(kk):
                e = experts[tok, layer, j]
                dup = False
                for jj in range(j):  # a one-hot column is 1 once
                    if experts[tok, layer, jj] == e:
                        dup = True
                if not dup:
                    row = (layer - first) * num_experts + e
                    for c in range(num_experts):
                        sc[c] += coef[row, c]
        if pair_at >= 0:  # the two lowest ids at s (np.sort's first two)
            a = num_experts
            b = num_experts
            for j in range(kk):
                e = experts[tok, s, j]
                if e < a:
                    b = a
                    a = e
                elif e < b:
                    b = e
            row = pair_at + a * num_experts + b
            for c in range(num_experts):
                sc[c] += coef[row, c]
        if prev_known[tok]:
            p = prev[tok]
            for bl in range(prev_layers.shape[0]):
                for j in range(kk):
                    e = experts[p, prev_layers[bl], j]
                    dup = False
                    for jj in range(j):
                        if experts[p, prev_layers[bl], jj] == e:
                            dup = True
                    if not dup:
                        row = prev_at + bl * num_experts + e
                        for c in range(num_experts):
                            sc[c] += coef[row, c]
            for c in range(num_experts):
                sc[c] += coef[known_at, c]
        for j in range(prior.shape[1]):
            v = np.float64(prior[i, j])
            for c in range(num_experts):
                sc[c] += v * coef[known_at + 1 + j, c]
        taken[:] = False
        for r in range(k):  # the highest score, lowest id first among equals
            best = -1
            for e in range(num_experts):
                if not taken[e] and (best < 0 or sc[e] > sc[best]):
                    best = e
            taken[best] = True
            out[i, r] = best
    return out
