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
from expertsim.jit import map_threads
from expertsim.policies.ridge import (
    RidgeFit, active_columns, own_columns, pair_gram, prior_sums, route_counts, set_ridge,
)
from expertsim.policies.ridge_scores import padded_coef, ridge_top, ridge_unions


LAZY_COLUMNS_MAX = 2048  # layers x experts up to which ridge pairs are fitted when first asked (their
# shared counts, 3 int32 matrices of that width squared, at most 50 MB, kept until then); above, all at fit


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
        self._columns = None

    def columns(self, experts: np.ndarray, num_experts: int) -> np.ndarray:
        """The trace's :func:`~expertsim.policies.ridge.own_columns` (made at the first call)."""
        if self._columns is None:
            self._columns = own_columns(np.ascontiguousarray(experts, dtype=np.int64), num_experts)
        return self._columns


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
        self._models: dict[tuple[int, int], object] = {}  # see the models property
        self._sklearn: dict | None = None  # the models property's scikit-learn objects
        self._pending: set = set()  # ridge pairs trained on first use (fit_pairs)
        self._train = None  # what their fits read, until none is pending
        self.fit_s = 0.0
        self._index: tuple[object, _TraceIndex] | None = None
        self._layouts: dict = {}  # (s, t, pair, prior) -> the features' column layout
        self._one = None  # (trace, token, rows): the last token _features_one read
        self._coef: dict = {}  # (s, t) -> a ridge model's (coef [width, E] float64, intercept)
        self._codes = None  # (trace, each token's row of the prior tables)
        self._tables: dict = {}  # t -> _prior_table(t)

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
        first, pair_at, prev_layers, prev_at, known_at, width, use_prior = self._layout(trace, s, t)
        own = s + 1 - first  # one-hot blocks of the token's own routing
        X = np.zeros((n, width), dtype=np.float32)
        rows = np.arange(n)[:, None]
        if own > 0:
            routes = trace.experts[tokens, first:s + 1].astype(np.int64)  # [n, own, k]
            X[rows, (routes + (np.arange(own) * E)[None, :, None]).reshape(n, -1)] = 1.0
        if pair_at >= 0:
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
            X[:, known_at + 1:] = self._prior_table(t)[self._trace_codes(trace, tokens)]
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
        None when unknown; its one-hot columns over every layer) and its row of the prior tables
        (:meth:`_prior_codes`; None without a prior), kept for the token last asked about (a pass
        asks at every layer)."""
        one = self._one
        if one is not None and one[0] is trace and one[1] == token:
            return one[2]
        idx = self._trace_index(trace)
        rows = trace.experts[token].tolist()
        prev = trace.experts[int(idx.prev[token])].tolist() if idx.prev_known[token] else None
        E = self._E
        own = np.zeros(len(rows) * E, dtype=np.float32)  # one-hot over every layer (window None: a prefix)
        own[[b * E + e for b, layer in enumerate(rows) for e in layer]] = 1.0
        code = None
        if self._priors is not None and trace.token_id is not None:
            code = int(self._prior_codes(trace.token_id[token:token + 1])[0])
        self._one = (trace, token, (rows, prev, own, code))
        return self._one[2]

    def _features_one(self, trace, token: int, s: int, t: int) -> np.ndarray:
        """:meth:`features` of one token (the same [1, width] float32 matrix, tested equal)."""
        E = self._E
        first, pair_at, prev_layers, prev_at, known_at, width, use_prior = self._layout(trace, s, t)
        rows, prev, own, code = self._token_rows(trace, token)
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
            row[known_at + 1:] = self._prior_table(t)[code]
        return X

    def _token_prior(self, token_ids: np.ndarray, t: int) -> np.ndarray:
        """The smoothed prior at ``t`` [tokens, experts] (float32) of these token ids."""
        return self._prior_table(t)[self._prior_codes(token_ids)]

    def _prior_codes(self, token_ids: np.ndarray) -> np.ndarray:
        """Each token id's row of :meth:`_prior_table`: its place in the training vocabulary, or
        the vocabulary's size (the last row) when it is not there."""
        vocab = self._priors[0]
        pos = np.minimum(np.searchsorted(vocab, token_ids), len(vocab) - 1)
        return np.where(vocab[pos] == token_ids, pos, len(vocab))

    def _prior_table(self, t: int) -> np.ndarray:
        """[vocabulary + 1, experts] float32: the smoothed prior at ``t`` of each training token
        id, (its count of each expert + m x the training mean) / (its count + m), and in the last
        row the training mean (an id never seen in training). Kept per ``t``."""
        table = self._tables.get(t)
        if table is None:
            vocab, counts, sums, base = self._priors
            m = self.prior_smoothing
            table = np.empty((len(vocab) + 1, self._E), dtype=np.float32)
            table[:-1] = (sums[:, t] + m * base[t]) / (counts[:, None] + m)
            table[-1] = (0.0 + m * base[t]) / (0.0 + m)
            self._tables[t] = table
        return table

    def _trace_codes(self, trace, tokens: np.ndarray | None = None) -> np.ndarray:
        """:meth:`_prior_codes` of the trace's tokens (every one, or ``tokens``), looked up once
        per trace (when asked for a quarter of its tokens or more; a few tokens of another trace
        are looked up on their own)."""
        if self._codes is None or self._codes[0] is not trace:
            if tokens is not None and 4 * len(tokens) < trace.num_tokens:
                return self._prior_codes(trace.token_id[tokens])
            self._codes = (trace, self._prior_codes(trace.token_id))
        return self._codes[1] if tokens is None else self._codes[1][tokens]

    # --- training ------------------------------------------------------------------------
    def pairs(self, num_layers: int) -> list[tuple[int, int]]:
        out = [(s, s + d) for s in range(num_layers) for d in self.distances if s + d < num_layers]
        if self.path:
            out += [(-1, t) for t in range(num_layers)]
        return out if self.only is None else [p for p in out if p in self.only]

    def _new_model(self):
        if self.model == "ridge":  # fitted by set_ridge; scikit-learn's Ridge on request (the models property)
            return RidgeFit(alpha=self.alpha)
        from sklearn.linear_model import LogisticRegression
        from sklearn.multiclass import OneVsRestClassifier

        return OneVsRestClassifier(LogisticRegression(max_iter=200, random_state=self.seed))

    def fit(self, trace) -> "RoutePredictor":
        t0 = time.perf_counter()
        if trace.num_tokens == 0:
            raise PolicyError("cannot train a route predictor on an empty trace")
        self._E, self._L = trace.num_experts, trace.num_layers
        self._priors = None
        self._layouts, self._one, self._coef, self._codes, self._tables = {}, None, {}, None, {}
        if trace.token_id is not None:
            vocab, inverse = np.unique(trace.token_id, return_inverse=True)
            counts = np.bincount(inverse, minlength=len(vocab)).astype(np.float64)
            # each (token id, layer, expert)'s count: exact integers, in any order
            cells = (inverse.astype(np.int64)[:, None, None] * self._L
                     + np.arange(self._L)[None, :, None]) * self._E + trace.experts.astype(np.int64)
            sums = np.bincount(cells.ravel(), minlength=len(vocab) * self._L * self._E).astype(np.float64)
            sums = sums.reshape(len(vocab), self._L, self._E)
            base = sums.sum(axis=0) / trace.num_tokens
            self._priors = (vocab, counts, sums, base)
        self._models, self._pending, self._train, self._sklearn = {}, set(), None, None
        # Small dense solves: one BLAS thread is faster than many (and kinder to a shared machine).
        with _one_blas_thread():
            if self.model == "ridge":
                self._ridge_state(trace)
            else:
                self._fit_logistic(trace)
        self.fit_s = time.perf_counter() - t0
        if self._L * self._E > LAZY_COLUMNS_MAX:  # large counts: every pair now, the counts freed
            self.fit_pairs(self._pending)
        return self

    @property
    def models(self) -> dict:
        """(source, target) -> the pair's trained scikit-learn model, every pair (a ridge pair
        not yet asked for is fitted now, see :meth:`fit_pairs`; the runs themselves score the
        fitted coefficients without importing scikit-learn)."""
        if self._pending:
            self.fit_pairs(self._pending)
        if self._sklearn is None or len(self._sklearn) != len(self._models):
            self._sklearn = {pair: m.to_sklearn() if isinstance(m, RidgeFit) else m for pair, m in self._models.items()}
        return self._sklearn

    def _model(self, s: int, t: int):
        """The pair's model (fitted now when it has not been yet), or None when not trained."""
        model = self._models.get((s, t))
        if model is None and (s, t) in self._pending:
            self.fit_pairs([(s, t)])
            model = self._models[(s, t)]
        return model

    def _fit_logistic(self, trace) -> None:
        tokens = np.arange(trace.num_tokens)
        for s, t in self.pairs(self._L):
            X = self.features(trace, tokens, s, t)
            Y = _onehot(trace.experts[:, t], self._E)
            if (Y.min(axis=0) == Y.max(axis=0)).any():
                # an expert never (or always) chosen in training: a fixed score, no classifier
                self._models[(s, t)] = ("constant", Y.mean(axis=0))
                continue
            model = self._new_model()
            model.fit(X, Y)
            self._models[(s, t)] = model

    def _ridge_state(self, trace) -> None:
        """What every pair's ridge fit reads (the training trace's columns and the counts they
        share, :func:`~expertsim.policies.ridge.route_counts`), kept until every pair is fitted:
        a pair is fitted when first asked for (:meth:`fit_pairs`; each pair's model is its own,
        so which pairs are fitted together changes no bit), and a run that asks for a third of
        them (ExpertFlow's adaptive distance when it never moves) trains a third."""
        pairs = self.pairs(self._L)
        if not pairs:
            return
        E, L = self._E, self._L
        experts = np.ascontiguousarray(trace.experts, dtype=np.int64)
        idx = _TraceIndex(trace)
        cols = idx.columns(experts, E)
        counts = route_counts(cols, idx.prev, idx.prev_known, L * E)
        codes = self._prior_codes(trace.token_id) if self._priors is not None and trace.token_id is not None \
            else None
        self._train = (trace, experts, idx, cols, counts, codes)
        self._pending = set(pairs)

    def fit_pairs(self, pairs) -> None:
        """Fit the ridge pairs among ``pairs`` not fitted yet (from the counts :meth:`fit` kept;
        the pairs into one target layer together, the targets on threads), then free the counts
        when no pair is left."""
        todo = sorted(set(pairs) & self._pending)
        if not todo:
            return
        t0 = time.perf_counter()
        with _one_blas_thread():  # small dense solves: one BLAS thread is faster than many
            self._fit_ridge_pairs(todo)
        self._pending -= set(todo)
        if not self._pending:
            self._train = None
        self.fit_s += time.perf_counter() - t0

    def _fit_ridge_pairs(self, pairs) -> None:
        """These pairs' ridge models from their X^T X and X^T Y (:mod:`~expertsim.policies.ridge`:
        the same sums as from :meth:`features`, assembled from counts the pairs share, without
        building the features)."""
        trace, experts, idx, cols, counts, codes = self._train
        E, L = self._E, self._L
        empty = (np.zeros((0, 0)), np.zeros((0, 0)), np.zeros(0), np.zeros((0, 0)), np.zeros(0))
        no_prior = np.zeros((trace.num_tokens, 0), dtype=np.float32)

        def fit_target(t: int) -> list:  # the pairs into layer t (mostly kernel calls: threads)
            mine = [s for s, tt in pairs if tt == t]
            layouts = {s: self._layout(trace, s, t) for s in mine}
            if layouts[mine[0]][6]:  # with the token-id prior
                prior = self._prior_table(t)[codes]
                flagged = np.zeros(L, dtype=np.bool_)
                for lay in layouts.values():
                    flagged[lay[2]] = True
                sums = prior_sums(cols, idx.prev, idx.prev_known, prior, t + 1, flagged, L * E)
            else:
                prior, sums = no_prior, empty
            out = []
            for s in mine:
                first, pair_at, prev_layers, prev_at, known_at, width, _ = layouts[s]
                prev_layers = np.asarray(prev_layers, dtype=np.int64)
                index = active_columns(cols, experts, idx.prev, idx.prev_known, first, s, pair_at, prev_layers,
                                       prev_at, known_at, width, counts, sums)
                sx, sy, G, B = pair_gram(cols, experts, idx.prev, idx.prev_known, prior, first, s, t, pair_at,
                                         prev_layers, prev_at, known_at, index, counts, sums)
                model = self._new_model()
                set_ridge(model, trace.num_tokens, sx, sy, G, B, index)
                out.append(((s, t), model))
            return out

        for part in map_threads(fit_target, sorted({t for _, t in pairs})):
            self._models.update(part)

    # --- inference -----------------------------------------------------------------------
    def scores(self, trace, tokens: np.ndarray, s: int, t: int) -> np.ndarray:
        model = self._model(s, t)
        if model is None:
            raise PolicyError(
                f"no predictor from layer {s} to layer {t}: trained distances {self.distances}, "
                f"path={self.path}"
            )
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
        are summed over the token's nonzero features only (:mod:`~expertsim.policies.ridge_scores`:
        the same model, each token on its own, in a fixed order, so a token's prediction does not
        depend on which tokens are asked with it)."""
        if self._scored(s, t):
            return ridge_top(*self._ridge_args(trace, np.asarray(tokens, dtype=np.int64), s, t), k)
        sc = self.scores(trace, tokens, s, t)
        return np.argsort(-sc, axis=1, kind="stable")[:, :k]  # stable: equal scores keep id order

    def predict_union(self, trace, tokens: np.ndarray, s: int, t: int, k: int) -> list[int]:
        """The experts of :meth:`predict_top` over all ``tokens`` (ascending, each once)."""
        if self._scored(s, t):
            tokens = np.asarray(tokens, dtype=np.int64)
            bounds = np.array([0, len(tokens)], dtype=np.int64)
            return self.predict_unions(trace, tokens, bounds[:1], bounds[1:], s, t, k)[1].tolist()
        return np.unique(self.predict_top(trace, tokens, s, t, k)).tolist()

    def predict_unions(self, trace, tokens: np.ndarray, start: np.ndarray, stop: np.ndarray, s: int, t: int,
                       k: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`predict_union` of each pass ``tokens[start[p]:stop[p]]``, at once: (the count
        per pass, the experts pass after pass), int64."""
        if self._scored(s, t):
            tokens = np.asarray(tokens, dtype=np.int64)
            args = self._ridge_args(trace, tokens, s, t)
            return ridge_unions(tokens, np.asarray(start, dtype=np.int64), np.asarray(stop, dtype=np.int64),
                                *args[1:], k)
        parts = [self.predict_union(trace, tokens[a:b], s, t, k) for a, b in zip(start, stop)]
        return (np.array([len(u) for u in parts], dtype=np.int64),
                np.array([e for u in parts for e in u], dtype=np.int64))

    def _scored(self, s: int, t: int) -> bool:
        """Whether (s, t) has a ridge model the compiled scorer reads."""
        model = self._model(s, t)
        return self.model == "ridge" and model is not None and not isinstance(model, tuple)

    def _ridge_args(self, trace, tokens, s, t) -> tuple:
        """The scorer's arguments for these tokens at (s, t), but k."""
        E = self._E
        first, pair_at, prev_layers, prev_at, known_at, width, use_prior = self._layout(trace, s, t)
        idx = self._trace_index(trace)
        cached = self._coef.get((s, t))
        if cached is None:  # coef [width, E padded] float64, rows contiguous; intercept [E padded]
            model = self._models[(s, t)]
            cached = self._coef[(s, t)] = padded_coef(np.asarray(model.coef_, dtype=np.float64).T,
                                                      np.asarray(model.intercept_, dtype=np.float64).ravel())
        coef, intercept = cached
        if use_prior:
            table, codes = self._prior_table(t), self._trace_codes(trace, tokens)
        else:
            table, codes = np.zeros((1, 0), dtype=np.float32), np.zeros(len(tokens), dtype=np.int64)
        experts = np.asarray(trace.experts)
        return (tokens, experts, idx.columns(experts, E), idx.prev, idx.prev_known, first, s, pair_at,
                np.asarray(prev_layers, dtype=np.int64), prev_at, known_at, table, codes, coef, intercept, E)

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
        self.fit_pairs(pairs)  # together (a pair asked alone is fitted alone)
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
