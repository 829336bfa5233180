"""Token scheduling: which ready requests form the next batch, and in what order a layer's experts
are served.

Batch selection answers ``System.select_batch(ready, max_batch, now_ns)``; ``ready`` lists the
running requests in start order, then the waiting ones by arrival, so ``ready[0]`` is the oldest.
Every scheduler here always takes the oldest ready request (no starvation) and fills the rest of
the batch by its criterion. Routes are the predicted (layer, expert) keys of each request's next
pass, from a :class:`RouteTracker` (the request's previous token's routing: past information
only) or any mapping the caller supplies.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from expertsim.errors import PolicyError
from expertsim.policies.base import LayerObservation
from expertsim.policies.cache import LOADING
from expertsim.policies.registration import register_scheduler


class RouteTracker:
    """The predicted route of each request's next pass: the keys (layer x experts + expert) its
    last processed token used (routing is temporally local: a token tends to reuse its
    predecessor's experts). It learns from the layers the engine serves, so it never sees the
    future; a request not yet run has no route (None)."""

    def __init__(self, num_experts: int):
        self.num_experts = int(num_experts)
        self._last: dict[int, dict[int, np.ndarray]] = {}  # request -> layer -> experts

    def observe(self, obs: LayerObservation) -> None:
        requests = obs.trace.request[obs.tokens]
        if len(requests) == 1:  # one token (a decode pass at batch 1): as below, without np.unique
            self._last.setdefault(int(requests[0]), {})[obs.layer] = obs.experts[-1].astype(np.int64)
            return
        for r in np.unique(requests):
            rows = obs.experts[requests == r]
            self._last.setdefault(int(r), {})[obs.layer] = rows[-1].astype(np.int64)

    def route(self, request: int) -> np.ndarray | None:
        layers = self._last.get(int(request))
        if not layers:
            return None
        return np.unique(np.concatenate([layer * self.num_experts + e for layer, e in layers.items()]))

    def routes(self, requests: Sequence[int]) -> dict[int, np.ndarray | None]:
        return {int(r): self.route(r) for r in requests}


@register_scheduler("fifo")
class FifoScheduler:
    """First come, first served: the ``max_batch`` oldest ready requests (vLLM/Orca default)."""

    name = "fifo"

    def select(self, ready: Sequence[int], max_batch: int, routes: Mapping[int, np.ndarray | None] | None = None,
               resident: np.ndarray | None = None) -> list[int]:
        return [int(r) for r in list(ready)[:max_batch]]

    def params(self) -> dict:
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@register_scheduler("route-group")
class RouteGroupScheduler(FifoScheduler):
    """ExpertFlow's token scheduler (He et al., arXiv 2410.17954): regroup pending tokens so that
    a batch's tokens share experts. Greedy: start from the oldest request; repeatedly add the
    request whose predicted route adds the fewest experts not already in the batch's union
    (ties: older first). A request without a route counts as adding ``unknown_cost`` experts,
    by default every (layer, expert) a route could hold, so known routes are preferred."""

    name = "route-group"

    def __init__(self, unknown_cost: int | None = None):
        if unknown_cost is not None and (isinstance(unknown_cost, bool) or not isinstance(unknown_cost, int)
                                         or unknown_cost < 0):
            raise PolicyError(f"route-group: unknown_cost must be a count of experts >= 0 (or unset: every "
                              f"(layer, expert) a route could hold), got {unknown_cost!r}")
        self.unknown_cost = unknown_cost

    def params(self) -> dict:
        return {"unknown_cost": self.unknown_cost}

    def select(self, ready, max_batch, routes=None, resident=None):
        ready = [int(r) for r in ready]
        if not ready:
            return []
        routes = routes or {}
        chosen = [ready[0]]
        union = set() if routes.get(ready[0]) is None else set(routes[ready[0]].tolist())
        rest = ready[1:]
        while rest and len(chosen) < max_batch:
            best, best_cost = None, None
            for r in rest:  # in age order, so a strict < keeps the older on ties
                route = routes.get(r)
                cost = (self.unknown_cost if self.unknown_cost is not None else 10**9) if route is None \
                    else len(set(route.tolist()) - union)
                if best_cost is None or cost < best_cost:
                    best, best_cost = r, cost
            chosen.append(best)
            rest.remove(best)
            if routes.get(best) is not None:
                union |= set(routes[best].tolist())
        return chosen

    @staticmethod
    def distinct_experts(batch: Sequence[int], routes: Mapping[int, np.ndarray | None]) -> int:
        """Distinct (layer, expert) keys of a batch's routes (the quantity regrouping minimises)."""
        keys = [routes[r] for r in batch if routes.get(r) is not None]
        return len(np.unique(np.concatenate(keys))) if keys else 0


@register_scheduler("cache-aware")
class CacheAwareScheduler(FifoScheduler):
    """Cache-aware batching: after the oldest request, the requests whose predicted experts are
    most resident on the GPU run first (fewest predicted misses; ties: older first). Requests
    without a route go last, in age order."""

    name = "cache-aware"

    def select(self, ready, max_batch, routes=None, resident=None):
        ready = [int(r) for r in ready]
        if not ready:
            return []
        routes = routes or {}

        def misses(r: int) -> float:
            route = routes.get(r)
            if route is None or resident is None:
                return float("inf")
            return float(np.count_nonzero(~resident[route]))

        rest = sorted(ready[1:], key=lambda r: (misses(r), ready.index(r)))
        return [ready[0]] + rest[:max_batch - 1]


def cache_aware_order(obs: LayerObservation) -> list[int]:
    """Serve order of a layer's needed experts: resident ones first, then those still loading
    (their copies are in flight), then misses; within a group more tokens first (ties: lowest id),
    so the GPU computes while the copies land."""
    cache = obs.cache
    needed, resident, tokens = obs.needed.tolist(), obs.resident.tolist(), obs.tokens_per_expert.tolist()
    state, base = cache.state, obs.layer * cache.num_experts
    group = [2 if not resident[i] else (1 if state[base + e] == LOADING else 0) for i, e in enumerate(needed)]
    idx = sorted(range(len(needed)), key=lambda i: (group[i], -int(tokens[i]), needed[i]))
    return [needed[i] for i in idx]
