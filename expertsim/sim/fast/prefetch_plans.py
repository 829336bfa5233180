"""Trace-only prefetchers' requests for every (pass, MoE layer) at once, equal to asking the
prefetcher itself layer by layer in the DES's order (:func:`expertsim.sim.fast.plans.prefetch_plan`
uses them; the tests hold each to asking). Each returns (requests per access group, target layer,
expert, priority), per group in the order the prefetcher lists them.

- the ring (:class:`~expertsim.policies.prefetch.LayerRingPrefetch`) and the exact pre-gate
  (:class:`~expertsim.policies.prefetch.PregatedPrefetch` at accuracy 1): array arithmetic on the
  access groups;
- the pre-gate below accuracy 1 and the modelled speculation
  (:class:`~expertsim.policies.prefetch.ModelledSpeculation`): a compiled loop that draws from the
  prefetcher's own seeded generator in the DES's order (numba's ``Generator`` methods draw the
  same numbers as numpy's from the same state, so the guesses are the same);
- the recorded speculation (:class:`~expertsim.policies.prefetch.SpeculativePrefetch`): the
  trace's ``spec_d{d}`` guesses of each pass's tokens, deduplicated, in one compiled loop;
- the learned predictor (:class:`~expertsim.policies.prefetch.LearnedPrefetch`, also under
  ExpertFlow's adaptive distance): each layer pair's pass unions, then the plan of each distance
  in the kernel's form (:func:`learned_distance_plans`).

An access group is one (pass, MoE layer); groups run pass by pass, layers in order, so the same
pass's group of layer ``t`` is ``g + t - layer[g]``.
"""
from __future__ import annotations

import numpy as np

from expertsim.sim.fast.jit import _njit, map_threads


def ring_requests(groups, num_moe, num_experts, depth):
    """LayerRingPrefetch at every group: layers l+1 .. l+depth (wrapping), every expert, priority d."""
    d = np.arange(1, depth + 1)
    target = (groups.layer[:, None] + d[None, :]) % num_moe  # [groups, depth]
    layer = np.repeat(target.ravel(), num_experts)
    prio = np.repeat(np.broadcast_to(d, target.shape).ravel(), num_experts)
    expert = np.tile(np.arange(num_experts), target.size)
    return np.full(groups.num_groups, depth * num_experts), layer, expert, prio


def pregated_requests(groups, num_moe, num_experts, prefetcher):
    """PregatedPrefetch at accuracy 1: the pass's true experts at each target layer (the access
    group of that layer), priority = target - layer."""
    n_groups = groups.num_groups
    sizes = np.diff(groups.start)
    counts = np.zeros(n_groups, dtype=np.int64)
    parts_layer, parts_expert, parts_prio, parts_group = [], [], [], []
    for layer in range(num_moe):
        targets = prefetcher.targets(layer)
        mine = np.flatnonzero(groups.layer == layer)
        for t in targets:
            src = mine + (t - layer)  # the same pass's group of layer t
            n = sizes[src]
            idx = np.repeat(groups.start[src], n) + (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n))
            parts_group.append(np.repeat(mine, n))
            parts_layer.append(np.full(len(idx), t))
            parts_expert.append(groups.keys[idx] - t * num_experts)
            parts_prio.append(np.full(len(idx), t - layer))
            counts[mine] += n
    if not parts_group:
        return counts, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    group = np.concatenate(parts_group)
    order = np.argsort(group, kind="stable")  # per group: targets ascending, experts ascending
    return (counts, np.concatenate(parts_layer)[order].astype(np.int64),
            np.concatenate(parts_expert)[order].astype(np.int64), np.concatenate(parts_prio)[order].astype(np.int64))


def guessed_requests(groups, num_moe, num_experts, prefetcher):
    """PregatedPrefetch below accuracy 1 (and ModelledSpeculation): each true expert of the
    target layer kept with probability ``accuracy``, else a random wrong one, from the
    prefetcher's generator (``prefetcher._rng``, consumed as the DES would)."""
    return _guessed_kernel(groups.start, groups.keys.astype(np.int64), groups.layer.astype(np.int64), num_moe,
                           num_experts, max(int(prefetcher.distance), 1), float(prefetcher.accuracy), prefetcher._rng)


@_njit
def _targets(layer, d, num_moe):
    """Prefetcher.targets: (first, stop) of the target layers."""
    first = 1 if layer == 0 else layer + d
    return first, min(layer + d + 1, num_moe)


@_njit
def _guessed_kernel(gstart, gkeys, glayer, num_moe, num_experts, d, acc, rng):
    n_groups = glayer.shape[0]
    total = 0  # at most one guess per true expert
    for g in range(n_groups):
        first, stop = _targets(glayer[g], d, num_moe)
        for t in range(first, stop):
            src = g + t - glayer[g]
            total += gstart[src + 1] - gstart[src]
    counts = np.zeros(n_groups, dtype=np.int64)
    layer = np.zeros(total, dtype=np.int64)
    expert = np.zeros(total, dtype=np.int64)
    prio = np.zeros(total, dtype=np.int64)
    is_true = np.zeros(num_experts, dtype=np.bool_)
    out = np.zeros(num_experts, dtype=np.int64)
    n = 0
    for g in range(n_groups):
        first, stop = _targets(glayer[g], d, num_moe)
        for t in range(first, stop):
            src = g + t - glayer[g]
            a, b = gstart[src], gstart[src + 1]
            for i in range(a, b):
                is_true[gkeys[i] - t * num_experts] = True
            n_wrong = num_experts - (b - a)
            m = 0
            for i in range(a, b):  # ascending true experts, one draw each (PregatedPrefetch._predicted)
                e = gkeys[i] - t * num_experts
                if rng.random() < acc or n_wrong == 0:
                    out[m] = e
                else:
                    r = rng.integers(0, n_wrong)  # the r-th wrong expert, ascending
                    for w in range(num_experts):
                        if not is_true[w]:
                            if r == 0:
                                out[m] = w
                                break
                            r -= 1
                m += 1
            for i in range(a, b):
                is_true[gkeys[i] - t * num_experts] = False
            _emit_sorted_unique(out, m, t, t - glayer[g], layer, expert, prio, n)
            k = _count_unique(out, m)
            n += k
            counts[g] += k
    return counts, layer[:n], expert[:n], prio[:n]


@_njit
def _emit_sorted_unique(out, m, t, p, layer, expert, prio, n):
    """Sort out[:m] in place and write its distinct values from row n."""
    for i in range(1, m):
        x = out[i]
        j = i - 1
        while j >= 0 and out[j] > x:
            out[j + 1] = out[j]
            j -= 1
        out[j + 1] = x
    w = n
    for i in range(m):
        if i == 0 or out[i] != out[i - 1]:
            layer[w] = t
            expert[w] = out[i]
            prio[w] = p
            w += 1


@_njit
def _count_unique(out, m):
    k = 0
    for i in range(m):
        if i == 0 or out[i] != out[i - 1]:
            k += 1
    return k


def recorded_ok(trace, prefetcher) -> bool:
    """Whether :func:`recorded_requests` reads this trace's guesses as the prefetcher does (no
    negative guess: the prefetcher would ask for it, and the plan reports it)."""
    spec = trace.extras.get(f"spec_d{prefetcher.distance}")
    return (spec is not None and np.ndim(spec) >= 2 and len(spec) == trace.num_tokens
            and not (np.asarray(spec) < 0).any())


def recorded_requests(groups, sched, trace, num_moe, num_experts, prefetcher):
    """SpeculativePrefetch: at group (pass, l), the distinct guesses below ``num_experts`` of the
    pass's tokens in ``spec_d{d}`` at layer l, for layer l + d (none past the last layer)."""
    spec = np.asarray(trace.extras[f"spec_d{prefetcher.distance}"])
    spec = spec.reshape(spec.shape[0], spec.shape[1], -1).astype(np.int64)
    return _recorded_kernel(np.asarray(sched.start, dtype=np.int64), np.asarray(sched.stop, dtype=np.int64), spec,
                            num_moe, num_experts, int(prefetcher.distance))


@_njit
def _recorded_kernel(pstart, pstop, spec, num_moe, num_experts, d):
    n_pass = pstart.shape[0]
    n_groups = n_pass * num_moe
    counts = np.zeros(n_groups, dtype=np.int64)
    total = 0
    for p in range(n_pass):
        total += min((pstop[p] - pstart[p]) * spec.shape[2], num_experts) * max(num_moe - d, 0)
    layer = np.zeros(total, dtype=np.int64)
    expert = np.zeros(total, dtype=np.int64)
    prio = np.zeros(total, dtype=np.int64)
    seen = np.zeros(num_experts, dtype=np.bool_)
    n = 0
    for p in range(n_pass):
        for lay in range(num_moe):
            t = lay + d
            if t >= num_moe:
                continue
            for tok in range(pstart[p], pstop[p]):
                for j in range(spec.shape[2]):
                    e = spec[tok, lay, j]
                    if 0 <= e < num_experts:
                        seen[e] = True
            for e in range(num_experts):  # np.unique: ascending
                if seen[e]:
                    seen[e] = False
                    layer[n] = t
                    expert[n] = e
                    prio[n] = d
                    n += 1
                    counts[p * num_moe + lay] += 1
    return counts, layer[:n], expert[:n], prio[:n]


def learned_ok(prefetcher) -> bool:
    """Whether :func:`learned_distance_plans` asks the predictor as the prefetcher does: a
    :class:`~expertsim.policies.predictors.RoutePredictor` (its own type, any model)."""
    from expertsim.policies.predictors import RoutePredictor

    return type(prefetcher.predictor) is RoutePredictor


def learned_distance_plans(sched, trace, num_moe, prefetcher, distances, make=None, found=None):
    """A LearnedPrefetch's untrimmed plan at every distance in ``distances`` (one for a fixed
    distance, ProMoE's; every distance AdaptiveDistance may move to, ExpertFlow's), what
    :func:`~expertsim.sim.fast.plans.prefetch_plan` gives with ``trim=False`` at each, as the
    kernel reads them: starts [distances, groups + 1] into the keys (target layer
    x experts + expert) and priorities of all of them, one after the other. Only the distances in
    ``make`` (None: all) are made; the others' starts are -1 (absent). Each layer pair's pass
    unions are predicted once, however many distances ask for it, and kept in ``found`` (a dict
    (layer, target) -> unions, for a later call that makes more of them)."""
    d0 = prefetcher.distance
    wanted = []
    try:
        for d in distances:
            prefetcher.distance = d
            wanted.append([] if make is not None and d not in make else
                          [(layer, t) for layer in range(num_moe) for t in prefetcher.targets(layer)])
    finally:
        prefetcher.distance = d0
    found = {} if found is None else found
    pairs = sorted({pair for w in wanted for pair in w})
    new = [pair for pair in pairs if pair not in found]
    found.update(zip(new, _pair_unions(sched, trace, prefetcher, new)))
    index = {pair: i for i, pair in enumerate(pairs)}
    sel = np.array([index[pair] for w in wanted for pair in w], dtype=np.int64)
    sel_start = np.concatenate([[0], np.cumsum([len(w) for w in wanted])]).astype(np.int64)
    n_pass = len(sched.start)
    per_pass = np.stack([found[pair][0] for pair in pairs], axis=1) if pairs else np.zeros((n_pass, 0), np.int64)
    sizes = np.array([len(found[pair][1]) for pair in pairs], dtype=np.int64)
    begin = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    experts = np.concatenate([found[pair][1] for pair in pairs]) if pairs else np.zeros(0, np.int64)
    layers = np.array([p[0] for p in pairs], dtype=np.int64)
    targets = np.array([p[1] for p in pairs], dtype=np.int64)
    absent = np.array([make is not None and d not in make for d in distances], dtype=np.bool_)
    return _distance_plans(n_pass, num_moe, trace.num_experts, layers, targets, per_pass, experts, begin, sel,
                           sel_start, absent)


def _pair_unions(sched, trace, prefetcher, pairs) -> list:
    """Every layer pair's pass unions (``RoutePredictor.predict_unions``, the pairs on threads):
    per pair, (counts per pass, the experts pass after pass)."""
    pstart = np.asarray(sched.start, dtype=np.int64)
    pstop = np.asarray(sched.stop, dtype=np.int64)
    tokens = np.arange(trace.num_tokens, dtype=np.int64)
    k = prefetcher._k

    def unions(pair):  # kernel calls (nogil): the pairs run on threads
        return prefetcher.predictor.predict_unions(trace, tokens, pstart, pstop, pair[0], pair[1], k)

    if not pairs:
        return []
    prefetcher.predictor.fit_pairs(pairs)  # the pairs not trained yet (RoutePredictor trains on first use)
    return [unions(pairs[0])] + map_threads(unions, pairs[1:])  # the first makes the predictor's tables


@_njit
def _distance_plans(n_pass, num_moe, num_experts, layers, targets, per_pass, experts, begin, sel, sel_start,
                    absent):
    """The plans of :func:`learned_distance_plans`: distance d asks at (pass, layer) for the
    pairs ``sel[sel_start[d]:sel_start[d + 1]]`` of that layer (in that order, targets
    ascending), each pair's pass union with priority target - layer; an ``absent`` one's starts
    are -1."""
    D = sel_start.shape[0] - 1
    n_pairs = layers.shape[0]
    n_groups = n_pass * num_moe
    total = 0
    for q in range(sel.shape[0]):
        for p in range(n_pass):
            total += per_pass[p, sel[q]]
    starts = np.zeros((D, n_groups + 1), dtype=np.int64)
    keys = np.zeros(total, dtype=np.int64)
    prios = np.zeros(total, dtype=np.int64)
    at = np.zeros(n_pairs, dtype=np.int64)
    n = 0
    for d in range(D):
        if absent[d]:
            starts[d, :] = -1
            continue
        at[:] = begin  # each pair's next pass's union
        for p in range(n_pass):
            q = sel_start[d]
            for layer in range(num_moe):
                starts[d, p * num_moe + layer] = n
                while q < sel_start[d + 1] and layers[sel[q]] == layer:
                    i = sel[q]
                    for j in range(per_pass[p, i]):
                        keys[n] = targets[i] * num_experts + experts[at[i] + j]
                        prios[n] = targets[i] - layer
                        n += 1
                    q += 1
            for i in range(n_pairs):
                at[i] += per_pass[p, i]
        starts[d, n_groups] = n
    return starts, keys, prios


def eam_requests(groups, sched, trace, num_moe, prefetcher):
    """ActivationMatrixPrefetch (MoE-Infinity): request by request, the history of past
    activation matrices, their norms and normalised rows by the prefetcher's own functions, then
    the request's passes in one compiled loop: the current matrix, the per-layer dot products
    with the history summed in layer order, the best match and the ranked experts of the next
    ``depth`` layers."""
    from expertsim.policies.prefetch import eam_history_norms, eam_match_rows

    L, E = num_moe, trace.num_experts
    width = prefetcher.width or prefetcher._k
    pstart = np.asarray(sched.start, dtype=np.int64)
    pstop = np.asarray(sched.stop, dtype=np.int64)
    request = np.asarray(sched.request)
    experts = np.asarray(trace.experts)
    past: list[np.ndarray] = []
    current = np.zeros((L, E))
    parts = []
    first = 0
    while first < len(pstart):  # one request's passes at a time (on_request_start between them)
        last = first + 1
        while last < len(pstart) and request[last] == request[first]:
            last += 1
        if current.any():
            past.append(current / current.sum())
            past = past[-prefetcher.history:]
        H = len(past)
        if H:
            hist = np.stack(past)
            norms = np.stack([eam_history_norms(hist, u) for u in range(L)])
            rows = eam_match_rows(hist)
        else:
            hist, norms, rows = np.zeros((0, L, E)), np.zeros((L, 0)), np.zeros((0, L, E))
        current = np.zeros((L, E))
        hist_t = np.ascontiguousarray(hist.transpose(1, 2, 0))  # [layers, experts, history]: contiguous over h
        parts.append(_eam_kernel(pstart[first:last], pstop[first:last], experts, hist_t, norms, rows, current,
                                 int(prefetcher.depth), int(width)))
        first = last
    counts = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    cat = [np.concatenate([p[i] for p in parts]) if parts else np.zeros(0, np.int64) for i in (1, 2, 3)]
    return counts, cat[0], cat[1], cat[2]


@_njit
def _eam_kernel(pstart, pstop, experts, hist_t, norms, rows, current, depth, width):
    """One request's passes (see :func:`eam_requests`); ``hist_t`` [layers, experts, history]: the
    past matrices with the history innermost, so a token's dot products and a layer's
    similarities run along contiguous rows (each sum still in the DES's order)."""
    n_pass = pstart.shape[0]
    H, L, E = hist_t.shape[2], current.shape[0], current.shape[1]
    counts = np.zeros(n_pass * L, dtype=np.int64)
    cap = n_pass * L * depth * min(width, E)
    layer_out = np.zeros(cap, dtype=np.int64)
    expert_out = np.zeros(cap, dtype=np.int64)
    prio_out = np.zeros(cap, dtype=np.int64)
    squares = np.zeros(L, dtype=np.int64)
    dots = np.zeros((L, H))
    prefix = np.zeros((L, H))
    sims = np.zeros(H)
    score = np.zeros(E)
    taken = np.zeros(E, dtype=np.bool_)
    n = 0
    for p in range(n_pass):
        for layer in range(L):
            g = p * L + layer
            sq = 0
            for tok in range(pstart[p], pstop[p]):
                for j in range(experts.shape[2]):
                    e = experts[tok, layer, j]
                    c = np.int64(current[layer, e])
                    sq += 2 * c + 1
                    current[layer, e] = c + 1.0
                    for h in range(H):
                        dots[layer, h] += hist_t[layer, e, h]
            squares[layer] += sq
            index = -1
            if H > 0:
                for h in range(H):
                    prefix[layer, h] = dots[layer, h] if layer == 0 else prefix[layer - 1, h] + dots[layer, h]
                total_sq = 0
                for u in range(layer + 1):
                    total_sq += squares[u]
                norm = np.sqrt(np.float64(total_sq))
                if norm == 0.0:
                    norm = 1.0
                for h in range(H):  # the similarities (one division each, as numpy's), then np.argmax
                    sims[h] = prefix[layer, h] / (norms[layer, h] * norm + 1e-12)
                best_sim = 0.0
                for h in range(H):  # np.argmax: the first largest
                    if index < 0 or sims[h] > best_sim:
                        index = h
                        best_sim = sims[h]
            for d in range(1, depth + 1):
                t = layer + d
                if t >= L:
                    break
                total = 0.0
                for e in range(E):
                    total += current[t, e]
                total = max(total, 1.0)
                anything = False
                for e in range(E):
                    score[e] = current[t, e] / total
                    if index >= 0:
                        score[e] = score[e] + rows[index, t, e]
                    if score[e] != 0.0:
                        anything = True
                if not anything:
                    continue
                taken[:] = False
                nb = min(width, E)
                for r in range(nb):  # the best by score, ties to the lowest id
                    b = -1
                    for e in range(E):
                        if not taken[e] and (b < 0 or score[e] > score[b]):
                            b = e
                    taken[b] = True
                for e in range(E):  # ascending, the positive ones
                    if taken[e] and score[e] > 0:
                        layer_out[n] = t
                        expert_out[n] = e
                        prio_out[n] = d
                        n += 1
                        counts[g] += 1
    return counts, layer_out[:n], expert_out[:n], prio_out[:n]
