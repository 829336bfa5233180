"""Prefetchers: which copies to start ahead of need, at each MoE layer.

A prefetcher returns :class:`PrefetchRequest` s at ``on_layer`` (the current layer's routing is
known; later layers' is not, unless the prefetcher declares itself an oracle). Requests are
optional admissions: the LayerServer drops one when the cache has no unpinned room, and the link
serves demand copies (priority 0) before prefetches (priority >= 1; lower first). Prefetchers
that adapt get the layer's outcome (stall time) at ``on_layer_end``.
"""
from __future__ import annotations

import math

import numpy as np

from expertsim.errors import PolicyError
from expertsim.policies.base import LayerObservation, LayerOutcome, Parameterised, PrefetchRequest, RunContext
from expertsim.policies.registration import register_prefetch


def _requests(layer: int, experts, priority: int) -> list[PrefetchRequest]:
    return [PrefetchRequest(layer=int(layer), expert=int(e), priority=int(priority)) for e in experts]


@register_prefetch("none")
class Prefetcher(Parameterised):
    """No prefetch: every expert is loaded on demand."""

    name = "none"
    oracle = False
    distance = 0

    def prepare(self, ctx: RunContext) -> None:
        self._L = ctx.cache.num_layers
        self._E = ctx.cache.num_experts
        self._k = ctx.trace.top_k if ctx.trace is not None else 1

    def on_request_start(self, request: int) -> None:
        pass

    def prefetch(self, obs: LayerObservation) -> list[PrefetchRequest]:
        return []

    def on_layer_end(self, obs: LayerObservation, outcome: LayerOutcome) -> None:
        pass

    def targets(self, layer: int) -> list[int]:
        """Layers to prefetch for at ``layer``: ``layer + distance``, and at layer 0 also the
        layers before it that nobody prefetched (the pipeline's warm-up)."""
        d = max(int(self.distance), 1)
        first = 1 if layer == 0 else layer + d
        return [t for t in range(first, layer + d + 1) if t < self._L]


@register_prefetch("pregated")
class PregatedPrefetch(Prefetcher):
    """Exact prefetch ``distance`` layers ahead with a given accuracy: the Pre-gated MoE case
    (Hwang et al., ISCA 2024, arXiv 2308.12066), whose trained pre-gate picks layer l+1's experts
    at layer l. It reads the trace's routing ``distance`` layers ahead (an oracle for models that
    were not pre-gated); with ``accuracy`` < 1 each true expert is replaced, with probability
    1 - accuracy, by a seeded random wrong one."""

    name = "pregated"
    oracle = True

    def __init__(self, distance: int = 1, accuracy: float = 1.0, seed: int = 0):
        if int(distance) < 1:
            raise PolicyError(f"prefetch distance must be >= 1, got {distance!r}")
        if not 0 <= accuracy <= 1:
            raise PolicyError(f"accuracy must be in [0, 1], got {accuracy!r}")
        self.distance = int(distance)
        self.accuracy = float(accuracy)
        self.seed = int(seed)

    def params(self) -> dict:
        return {"distance": self.distance, "accuracy": self.accuracy, "seed": self.seed}

    def prepare(self, ctx):
        super().prepare(ctx)
        self._rng = np.random.default_rng(self.seed)

    def predicted(self, obs: LayerObservation, target: int) -> np.ndarray:
        return np.array(self._predicted(obs, target), dtype=np.int64)

    def _predicted(self, obs: LayerObservation, target: int) -> list[int]:
        """:meth:`predicted` as a list of Python ints (ascending, each once)."""
        true = sorted(set(obs.trace.experts[obs.tokens, target].ravel().tolist()))
        if self.accuracy >= 1.0:
            return true
        out = []
        kept = set(true)
        wrong = [e for e in range(self._E) if e not in kept]  # np.setdiff1d
        for e in true:
            if self._rng.random() < self.accuracy or len(wrong) == 0:
                out.append(e)
            else:
                out.append(wrong[self._rng.integers(len(wrong))])
        return sorted(set(out))

    def prefetch(self, obs):
        out = []
        for t in self.targets(obs.layer):
            out += _requests(t, self._predicted(obs, t), t - obs.layer)
        return out


@register_prefetch("speculative-modelled")
class ModelledSpeculation(PregatedPrefetch):
    """Next-layer gate speculation when the trace did not record it: the guess for layer l+d is
    the true routing of l+d with each expert kept with probability ``recall`` and otherwise
    replaced by a seeded random wrong one. It reads the same pass's routing at the next layer
    (what the speculation approximates), not later tokens, so it is not an oracle of the future
    in the sense of Belady; its accuracy is an assumption the run states."""

    name = "speculative-modelled"
    oracle = False

    def __init__(self, distance: int = 1, recall: float = 0.8, seed: int = 0):
        super().__init__(distance=distance, accuracy=recall, seed=seed)

    def params(self) -> dict:
        return {"distance": self.distance, "recall": self.accuracy, "seed": self.seed}


@register_prefetch("speculative")
class SpeculativePrefetch(Prefetcher):
    """Next-layer gate speculation recorded in the trace: layer l+d's router applied to layer
    l's hidden state (mixtral-offloading, Eliseev & Mazur, arXiv 2312.17238; HOBBIT; ProMoE
    uses the same signal). Needs ``extras["spec_d{d}"]`` (``expertsim trace capture
    --spec-depth D``)."""

    name = "speculative"

    def __init__(self, distance: int = 1):
        if int(distance) < 1:
            raise PolicyError(f"speculation distance must be >= 1, got {distance!r}")
        self.distance = int(distance)

    def params(self) -> dict:
        return {"distance": self.distance}

    def prepare(self, ctx):
        super().prepare(ctx)
        key = f"spec_d{self.distance}"
        if key not in ctx.trace.extras:
            have = sorted(k for k in ctx.trace.extras if k.startswith("spec_d"))
            raise PolicyError(
                f"speculative prefetch at distance {self.distance} needs the trace's {key!r} "
                f"(recorded: {have or 'none'}); capture with `expertsim trace capture --spec-depth "
                f"{self.distance}`, or use the pregated prefetcher (accuracy parameter) instead"
            )

    def prefetch(self, obs):
        spec = obs.trace.extras[f"spec_d{self.distance}"]
        t = obs.layer + self.distance
        if t >= self._L:
            return []
        guess = spec[obs.tokens, obs.layer].astype(np.int64).ravel()
        guess = np.unique(guess[guess < self._E])  # drops the "layer does not exist" sentinel
        return _requests(t, guess, self.distance)


@register_prefetch("ring")
class LayerRingPrefetch(Prefetcher):
    """Whole next layer(s): SE-MoE's ring memory (Shen et al., arXiv 2205.10034). At layer l every
    expert of layers l+1 .. l+depth (wrapping to the next pass's first layers) is loaded; with a
    cache of (depth+1) layers of experts and FIFO eviction the buffers form a ring."""

    name = "ring"

    def __init__(self, depth: int = 1):
        if int(depth) < 1:
            raise PolicyError(f"ring depth must be >= 1, got {depth!r}")
        self.depth = int(depth)
        self.distance = self.depth

    def params(self) -> dict:
        return {"depth": self.depth}

    def prepare(self, ctx):
        super().prepare(ctx)
        self._ring: dict[int, list[PrefetchRequest]] = {}  # layer -> its requests (frozen: shared)

    def prefetch(self, obs):
        out = self._ring.get(obs.layer)
        if out is None:
            out = []
            for d in range(1, self.depth + 1):
                out += _requests((obs.layer + d) % self._L, range(self._E), d)
            self._ring[obs.layer] = out
        return list(out)


def eam_history_norms(hist: np.ndarray, upto: int) -> np.ndarray:
    """The norm of each past activation matrix (``hist`` [H, layers, experts]) over layers
    0..upto: the denominators of ActivationMatrixPrefetch's match (the fast engine's plan calls
    this same function, so the two agree to the bit)."""
    return np.linalg.norm(hist[:, :upto + 1].reshape(len(hist), -1), axis=1)


def eam_match_rows(hist: np.ndarray) -> np.ndarray:
    """Each past activation matrix's rows over their sums (at least 1e-12): what a match adds to
    the next layers' scores (shared with the fast engine's plan, as :func:`eam_history_norms`)."""
    return hist / np.maximum(hist.sum(axis=2, keepdims=True), 1e-12)


@register_prefetch("eam")
class ActivationMatrixPrefetch(Prefetcher):
    """MoE-Infinity's request-level history matching (Xue et al., arXiv 2401.14361): each finished
    request leaves its expert activation matrix (EAM, layers x experts counts) in a history of at
    most ``history`` matrices. At layer l the current request's EAM (its previous tokens, and
    this pass up to layer l) is matched by cosine similarity over layers 0..l; the matched EAM,
    plus the current request's own rows, ranks the experts of layers l+1 .. l+depth, and the
    ``width`` best of each are prefetched, nearer layers first."""

    name = "eam"

    def __init__(self, depth: int = 2, width: int | None = None, history: int = 128):
        if int(depth) < 1:
            raise PolicyError(f"eam depth must be >= 1, got {depth!r}")
        self.depth = int(depth)
        self.distance = self.depth
        self.width = None if width is None else int(width)
        self.history = int(history)

    def params(self) -> dict:
        return {"depth": self.depth, "width": self.width, "history": self.history}

    def prepare(self, ctx):
        super().prepare(ctx)
        self.current = np.zeros((self._L, self._E))
        self._squares = [0] * self._L  # per layer, the sum of current's squared counts (whole numbers)
        self.past: list[np.ndarray] = []
        self._forget()

    def _forget(self) -> None:
        """Drop what is derived from ``past`` (it changes only at a request's start)."""
        self._hist = None  # np.stack(self.past)
        self._norms: dict[int, np.ndarray] = {}  # upto -> the history's norms over layers 0..upto
        self._match_rows = None  # eam_match_rows(self._hist)
        self._rows: dict[tuple[int, int], list[float]] = {}  # (match, layer) -> its normalised row
        # the dot products of the current EAM with each past one: per layer (each use adds the
        # past EAM's entry), and over layers 0..l added in layer order (see _match_index)
        self._dots = np.zeros((len(self.past), self._L))
        self._prefix = np.zeros((len(self.past), self._L))

    def on_request_start(self, request):
        if self.current.any():
            self.past.append(self.current / self.current.sum())
            self.past = self.past[-self.history:]
            self._forget()
        self.current = np.zeros((self._L, self._E))
        self._squares = [0] * self._L
        self._dots[:] = 0.0
        self._prefix[:] = 0.0

    def _match_index(self, upto: int) -> int | None:
        """The index in ``past`` of the EAM that best matches layers 0..upto (None: no history).
        The history's stack and norms are computed once per request."""
        if not self.past:
            return None
        if self._hist is None:
            self._hist = np.stack(self.past)  # [H, L, E]
        norms = self._norms.get(upto)
        if norms is None:
            norms = self._norms[upto] = eam_history_norms(self._hist, upto)
        # h . q over layers 0..upto: the per-layer dot products (each use of the current
        # request added its past entry, in order) summed in layer order, kept as the pass goes
        # (a fixed order of float additions, which the fast engine's plan repeats)
        dots = self._prefix[:, upto]
        # np.linalg.norm(q) is sqrt(q . q); q holds whole counts, so q . q is the exact integer
        # kept in _squares, and both square roots are correctly rounded
        norm = math.sqrt(sum(self._squares[:upto + 1]))
        sim = dots / (norms * (norm or 1.0) + 1e-12)
        return int(np.argmax(sim))

    def matched(self, upto: int) -> np.ndarray | None:
        index = self._match_index(upto)
        return None if index is None else self._hist[index]

    def _match_row(self, index: int, t: int) -> list[float]:
        row = self._rows.get((index, t))
        if row is None:
            if self._match_rows is None:
                self._match_rows = eam_match_rows(self._hist)
            row = self._rows[(index, t)] = self._match_rows[index, t].tolist()
        return row

    def prefetch(self, obs):
        current = self.current
        layer = obs.layer
        row = current[layer]
        squares = 0
        if self.past and self._hist is None:
            self._hist = np.stack(self.past)  # [H, L, E]
        dots = self._dots[:, layer] if self.past else None
        for e in obs.experts.ravel().tolist():  # np.add.at, one by one
            count = int(row[e])
            squares += 2 * count + 1  # (c + 1)^2 - c^2
            row[e] = count + 1.0
            if dots is not None:
                dots += self._hist[:, layer, e]
        self._squares[layer] += squares
        if dots is not None:  # layers below this one are final for this pass
            self._prefix[:, layer] = dots if layer == 0 else self._prefix[:, layer - 1] + dots
        index = self._match_index(obs.layer)
        width = self.width or self._k
        E = self._E
        out = []
        for d in range(1, self.depth + 1):
            t = obs.layer + d
            if t >= self._L:
                break
            # Python floats, the float64 arithmetic of the arrays: counts / max(their sum, 1)
            # (+ the match's row over its sum); the best ``width`` by score, ties to the lowest id
            counts = current[t].tolist()
            total = max(sum(counts), 1.0)  # whole counts: exact in any order
            score = [c / total for c in counts]
            if index is not None:
                score = [a + b for a, b in zip(score, self._match_row(index, t))]
            if not any(score):
                continue
            best = sorted(range(E), key=lambda e: -score[e])[:width]  # stable: equal scores keep id order
            out += _requests(t, sorted(e for e in best if score[e] > 0), d)
        return out


@register_prefetch("learned")
class LearnedPrefetch(Prefetcher):
    """Prefetch the experts a learned predictor (:mod:`expertsim.policies.predictors`) expects
    ``distance`` layers ahead: the union over the pass's tokens of each token's predicted top-k
    (ProMoE, Song et al., arXiv 2410.22134, predicts from the current layer; here the features are
    the token's routing so far, the previous token's routing and the token id). The predictor is
    trained in ``prepare`` on a training split unless one is given (see
    :class:`~expertsim.policies.predictors.RoutePredictor`)."""

    name = "learned"

    def __init__(self, distance: int = 1, predictor=None, train_fraction: float = 0.5,
                 max_distance: int | None = None, seed: int = 0):
        if int(distance) < 1:
            raise PolicyError(f"prefetch distance must be >= 1, got {distance!r}")
        self.distance = int(distance)
        self.max_distance = int(max_distance or distance)
        self.fixed = True  # False under AdaptiveDistance, which moves ``distance`` during the run
        self.predictor = predictor
        self.train_fraction = float(train_fraction)
        self.seed = int(seed)

    def params(self) -> dict:
        return {"distance": self.distance, "train_fraction": self.train_fraction}

    def prepare(self, ctx):
        from expertsim.policies.predictors import RoutePredictor, training_requests

        super().prepare(ctx)
        if self.predictor is None:
            train = training_requests(ctx.trace, self.train_fraction)
            # a fixed distance asks only its targets' pairs (adaptive distances ask any)
            only = None if not self.fixed or self.max_distance != self.distance else \
                tuple((s, t) for s in range(self._L) for t in self.targets(s))
            self.predictor = RoutePredictor(distances=tuple(range(1, self.max_distance + 1)), seed=self.seed,
                                            only=only)
            self.predictor.fit(train)

    def prefetch(self, obs):
        out = []
        for t in self.targets(obs.layer):
            pred = self.predictor.predict_union(obs.trace, obs.tokens, obs.layer, t, self._k)
            out += _requests(t, pred, t - obs.layer)
        return out


@register_prefetch("path")
class PathPrefetch(LearnedPrefetch):
    """ExpertFlow's routing-path prediction (He et al., arXiv 2410.17954): before the first MoE
    layer the whole path (every layer's experts) is predicted from the token id and the previous
    token's routing, and layers 1..L-1 are prefetched at layer 0, nearer layers first. Layer 0
    itself is served on demand (the engine has no hook between passes)."""

    name = "path"

    def __init__(self, predictor=None, train_fraction: float = 0.5, seed: int = 0):
        super().__init__(distance=1, predictor=predictor, train_fraction=train_fraction, seed=seed)

    def params(self) -> dict:
        return {"train_fraction": self.train_fraction}

    def prepare(self, ctx):
        from expertsim.policies.predictors import RoutePredictor, training_requests

        Prefetcher.prepare(self, ctx)
        if self.predictor is None:
            train = training_requests(ctx.trace, self.train_fraction)
            self.predictor = RoutePredictor(distances=(), path=True, seed=self.seed)
            self.predictor.fit(train)

    def prefetch(self, obs):
        if obs.layer != 0:
            return []
        out = []
        for t in range(1, self._L):
            pred = self.predictor.predict_union(obs.trace, obs.tokens, -1, t, self._k)
            out += _requests(t, pred, t)
        return out


class AdaptiveDistance(Prefetcher):
    """Adaptive prefetch distance (ExpertFlow, arXiv 2510.26730): start from the number of layers
    whose compute hides one layer's expert copies (top-k expert bytes over the link / one layer's
    dense + expert compute), clamped to [min_distance, max_distance]; after every layer that
    stalled, look one layer further ahead; after ``calm_layers`` layers without a stall, one
    nearer. Wraps a prefetcher whose ``distance`` can change (pregated, learned)."""

    name = "adaptive"

    def __init__(self, inner: Prefetcher, min_distance: int = 1, max_distance: int = 4, calm_layers: int = 32):
        if not 1 <= int(min_distance) <= int(max_distance):
            raise PolicyError(f"need 1 <= min_distance <= max_distance, got {min_distance}, {max_distance}")
        self.inner = inner
        self.min_distance = int(min_distance)
        self.max_distance = int(max_distance)
        self.calm_layers = int(calm_layers)
        if isinstance(inner, LearnedPrefetch):
            inner.max_distance = max(inner.max_distance, self.max_distance)
            inner.fixed = False
        self.oracle = inner.oracle
        self.history: list[int] = []  # distance after each layer (for reports and tests)

    def params(self) -> dict:
        return {"inner": self.inner, "min_distance": self.min_distance, "max_distance": self.max_distance,
                "calm_layers": self.calm_layers}

    @property
    def distance(self) -> int:
        return self.inner.distance

    def initial_distance(self, ctx: RunContext) -> int:
        if ctx.cost is None or ctx.model is None:
            return self.min_distance
        m = ctx.model
        copy_ns = ctx.cost.transfer_time_ns(m.expert_bytes()) * m.top_k
        dense = getattr(ctx.cost, "dense_layer_time_ns", None)
        layer_ns = (dense(1, 1) if dense is not None else 0) + m.top_k * ctx.cost.expert_time_ns(1)
        return int(min(max(math.ceil(copy_ns / max(layer_ns, 1)), self.min_distance), self.max_distance))

    def prepare(self, ctx):
        self.inner.distance = self.initial_distance(ctx)
        self.inner.prepare(ctx)
        self._calm = 0
        self.history = []

    def on_request_start(self, request):
        self.inner.on_request_start(request)

    def prefetch(self, obs):
        return self.inner.prefetch(obs)

    def on_layer_end(self, obs, outcome):
        self.inner.on_layer_end(obs, outcome)
        if outcome.stall_ns > 0:
            self.inner.distance = min(self.inner.distance + 1, self.max_distance)
            self._calm = 0
        else:
            self._calm += 1
            if self._calm >= self.calm_layers:
                self.inner.distance = max(self.inner.distance - 1, self.min_distance)
                self._calm = 0
        self.history.append(self.inner.distance)
