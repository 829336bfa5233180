"""The fast engine's compiled path for prefetching systems: which systems it takes
(:func:`supports_simulation`), their prefetch requests computed before the run
(:func:`prefetch_plan`), and the run itself (:func:`simulate`) through
:func:`expertsim.sim.fast.prefetching.simulate_kernel`.

A prefetcher whose requests depend on the trace alone (the layer, the pass's tokens, its own
seeded generator) asks the same thing whatever the cache holds and whenever the layer runs, so
its requests can be asked for every (pass, MoE layer) before the run, in the DES's order (so a
seeded generator draws the same numbers), and trimmed as the system trims them
(:meth:`ComposedSystem.fit_prefetches`, which reads only the cache's size and the layer's
needed experts). What depends on the cache (which requests are admitted, what they evict, the
recency they give predicted residents) and on time is the kernel's.
"""
from __future__ import annotations


import numpy as np

from expertsim.errors import ConfigError
from expertsim.sim.fast.jit import _njit


COPY_ROWS = 1 << 16  # the kernel's copy table at first (the tests make it tiny to exercise its compaction)


def _trace_only_prefetchers() -> tuple:
    from expertsim.policies.prefetch import (
        ActivationMatrixPrefetch,
        LayerRingPrefetch,
        LearnedPrefetch,
        ModelledSpeculation,
        PregatedPrefetch,
        Prefetcher,
        SpeculativePrefetch,
    )

    return (Prefetcher, PregatedPrefetch, ModelledSpeculation, SpeculativePrefetch, LayerRingPrefetch,
            LearnedPrefetch, ActivationMatrixPrefetch)


def _prefetcher_ok(prefetcher) -> bool:
    from expertsim.policies.prefetch import AdaptiveDistance, LearnedPrefetch, PregatedPrefetch
    from expertsim.policies.systems import _AutoSpeculation

    if type(prefetcher) is _AutoSpeculation:  # resolved at prepare to one of the trace-only ones
        return True
    if type(prefetcher) is AdaptiveDistance:  # one plan per distance: the inner one must draw nothing
        inner = prefetcher.inner
        return type(inner) is LearnedPrefetch or (type(inner) is PregatedPrefetch and inner.accuracy >= 1.0)
    return type(prefetcher) in _trace_only_prefetchers()


def system_kind(system) -> str | None:
    """'lru', 'fifo', 'static', 'priority' or 'sequence' when ``system`` is a composed system
    the kernel reproduces: LRU, FIFO, a static hot set (Fiddler's, preloaded), MoE-Infinity's
    activation priority or DAOP's sequence activation for eviction; copy on miss, or the skip rule of
    :class:`~expertsim.policies.miss.SkipMisses`, or the CPU of
    :class:`~expertsim.policies.miss.CpuWhenCheaper` with its background copies (DAOP's placement
    among them), or HOBBIT's
    :class:`~expertsim.policies.miss.GateThresholdPrecision`; the FIFO
    scheduler; either serve order; no cross-layer allocator; a trace-only prefetcher; and no hook
    of its own beyond ComposedSystem's (Fiddler's initial hot set excepted); else None."""
    from expertsim.policies.base import System
    from expertsim.policies.eviction import FIFO, LRU, ActivationPriority, SequenceActivation, StaticHotSet
    from expertsim.policies.miss import CpuWhenCheaper, GateThresholdPrecision, MissHandler, SkipMisses
    from expertsim.policies.allocation import CrossLayerAllocator
    from expertsim.policies.scheduling import FifoScheduler, RouteGroupScheduler
    from expertsim.policies.systems import ComposedSystem, Fiddler, _DaopPlacement
    from expertsim.sim.fast.support import SYSTEM_HOOKS

    system = as_composed(system)
    if not isinstance(system, ComposedSystem) or getattr(system, "cpu_per_layer", False):
        return None
    for hook in SYSTEM_HOOKS:
        mine = getattr(type(system), hook)
        if mine is not getattr(ComposedSystem, hook) and mine is not getattr(System, hook) and not (
                hook == "initial_residents" and mine is Fiddler.initial_residents):
            return None
    if type(system.miss) not in (MissHandler, SkipMisses, CpuWhenCheaper, GateThresholdPrecision, _DaopPlacement):
        return None
    if type(system.scheduler) not in (FifoScheduler, RouteGroupScheduler):  # at batch 1 both take the oldest
        return None
    if system.allocator is not None and type(system.allocator) is not CrossLayerAllocator:
        return None
    if not _prefetcher_ok(system.prefetcher) or type(system).fit_prefetches is not ComposedSystem.fit_prefetches:
        return None
    return {LRU: "lru", FIFO: "fifo", StaticHotSet: "static", ActivationPriority: "priority",
            SequenceActivation: "sequence"}.get(type(system.eviction))


def as_composed(system):
    """The system the kernel runs: a plain :class:`~expertsim.policies.base.System` (an eviction
    policy, every miss copied) as the ComposedSystem it acts as at every hook (no prefetch, copy
    on miss, first-come first-served, hits first), over the same eviction policy object; any
    other system itself."""
    from expertsim.policies.base import System
    from expertsim.policies.systems import ComposedSystem

    if type(system) is System and system.eviction is not None:
        return ComposedSystem(eviction=system.eviction)
    return system


def supports_simulation(system, cache_config, options, *, model=None, hardware=None) -> bool:
    """True when :func:`simulate` reproduces the DES: a system :func:`system_kind` accepts, under
    the fast engine's run conditions (batch 1, closed or offline arrivals, one copy engine,
    whole-expert copies, no storage tier, no timeline; a write-back runtime allowed), the cache
    kept across requests."""
    from expertsim.sim.fast import support

    from expertsim.sim.cost import runtime_for

    if system_kind(system) is None or options.scope != "global":
        return False
    if getattr(system, "allocator", None) is not None and runtime_for(system, options.runtime).writeback:
        return False  # the write-backs of the allocator's evictions are not in the kernel
    return support.run_supported(system, cache_config, options, model=model, hardware=hardware, writeback=True)


def prefetch_plan(system, trace, sched, groups, cache, *, ask: bool = False, prefetcher=None, trim: bool = True):
    """Every (pass, MoE layer)'s prefetch requests, as the system makes and trims them in the DES:
    (start[groups + 1], keys, priorities). ``system`` is prepared; ``cache`` (empty) gives the
    sizes the trimming reads. The ring, the pre-gate, the modelled and the recorded speculation,
    the learned predictor and MoE-Infinity's matching are computed at once
    (:mod:`expertsim.sim.fast.prefetch_plans`); any other trace-only prefetcher is asked layer
    by layer, in the DES's order. ``prefetcher``: ask this one instead of the
    system's (AdaptiveDistance's inner one at a given distance); ``trim=False``: every request,
    by priority (the kernel fits them)."""
    from expertsim.policies.prefetch import (
        ActivationMatrixPrefetch, LayerRingPrefetch, LearnedPrefetch, ModelledSpeculation, PregatedPrefetch,
        SpeculativePrefetch,
    )
    from expertsim.sim.fast import prefetch_plans as pp

    num_moe, num_experts = cache.num_layers, cache.num_experts
    n_groups = groups.num_groups
    prefetcher = _inner(system.prefetcher) if prefetcher is None else prefetcher
    if not _asks(prefetcher):  # no prefetch at all
        return np.zeros(n_groups + 1, dtype=np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    kind = type(prefetcher)
    whole_passes = n_groups == len(sched.start) * num_moe  # every pass has a group per MoE layer
    if ask or not whole_passes:  # the reference: ask the prefetcher itself (the tests hold the others to it)
        counts, layer, expert, prio = _asked_requests(system, prefetcher, trace, sched, groups, cache)
    elif kind is LayerRingPrefetch:
        counts, layer, expert, prio = pp.ring_requests(groups, num_moe, num_experts, prefetcher.depth)
    elif kind in (PregatedPrefetch, ModelledSpeculation) and prefetcher.accuracy >= 1.0:
        counts, layer, expert, prio = pp.pregated_requests(groups, num_moe, num_experts, prefetcher)
    elif kind in (PregatedPrefetch, ModelledSpeculation):
        counts, layer, expert, prio = pp.guessed_requests(groups, num_moe, num_experts, prefetcher)
    elif kind is SpeculativePrefetch and pp.recorded_ok(trace, prefetcher):
        counts, layer, expert, prio = pp.recorded_requests(groups, sched, trace, num_moe, num_experts, prefetcher)
    elif kind is ActivationMatrixPrefetch:
        counts, layer, expert, prio = pp.eam_requests(groups, sched, trace, num_moe, prefetcher)
    elif kind is LearnedPrefetch and pp.learned_ok(prefetcher):  # in group and priority order already
        starts, keys, prio = pp.learned_distance_plans(sched, trace, num_moe, prefetcher, [prefetcher.distance])
        if not trim:
            return starts[0], keys, prio
        slots = (cache.capacity // max(cache.expert_bytes, 1)).astype(np.int64)
        return _fit_plan(starts[0], keys, prio, num_experts, num_moe, slots, np.diff(groups.start).astype(np.int64),
                         cache.num_partitions > 1)
    else:
        counts, layer, expert, prio = _asked_requests(system, prefetcher, trace, sched, groups, cache)
    bad = (layer < 0) | (layer >= num_moe) | (expert < 0) | (expert >= num_experts)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ConfigError(
            f"system {system.name!r} asked to prefetch (layer {int(layer[i])}, expert {int(expert[i])}), outside "
            f"{num_moe} layers x {num_experts} experts")
    # ComposedSystem.fit_prefetches, per group: by priority (stable), at most each partition's room
    group = np.repeat(np.arange(n_groups), counts)
    step = np.diff(group)
    if not ((step > 0) | ((step == 0) & (np.diff(prio) >= 0))).all():  # already in order: the sort changes nothing
        order = np.lexsort((prio, group))
        layer, expert, prio, group = layer[order], expert[order], prio[order], group[order]
    slots = (cache.capacity // max(cache.expert_bytes, 1)).astype(np.int64)
    needed = np.diff(groups.start).astype(np.int64)
    keep = _fit(group, layer, slots, needed, groups.layer.astype(np.int64), cache.num_partitions > 1) if trim else \
        np.ones(len(group), dtype=bool)
    start = np.zeros(n_groups + 1, dtype=np.int64)
    np.cumsum(np.bincount(group[keep], minlength=n_groups), out=start[1:])
    return start, (layer * num_experts + expert)[keep].astype(np.int64), prio[keep].astype(np.int64)


@_njit
def _fit(group, layer, slots, needed, group_layer, per_layer):
    keep = np.zeros(group.shape[0], dtype=np.bool_)
    used = np.zeros(slots.shape[0], dtype=np.int64)
    g_prev = -1
    first = 0
    for i in range(group.shape[0]):
        g = group[i]
        if g != g_prev:
            for j in range(first, i):  # reset the counts the previous group touched
                used[layer[j] if per_layer else 0] = 0
            first = i
            g_prev = g
        p = layer[i] if per_layer else 0
        limit = slots[p] - (needed[g] if (not per_layer or p == group_layer[g]) else 0)
        if used[p] < limit:
            keep[i] = True
            used[p] += 1
    return keep


@_njit
def _fit_plan(start, keys, prio, num_experts, num_moe, slots, needed, per_layer):
    """:func:`_fit` on a plan of whole passes already in priority order per group (group g at
    layer g % num_moe): the requests it keeps, as (start, keys, priorities)."""
    n_groups = start.shape[0] - 1
    out_start = np.zeros(n_groups + 1, dtype=np.int64)
    out_keys = np.zeros(keys.shape[0], dtype=np.int64)
    out_prio = np.zeros(keys.shape[0], dtype=np.int64)
    used = np.zeros(slots.shape[0], dtype=np.int64)
    n = 0
    for g in range(n_groups):
        out_start[g] = n
        for i in range(start[g], start[g + 1]):
            p = keys[i] // num_experts if per_layer else 0
            if used[p] < slots[p] - (needed[g] if (not per_layer or p == g % num_moe) else 0):
                used[p] += 1
                out_keys[n] = keys[i]
                out_prio[n] = prio[i]
                n += 1
        for i in range(start[g], start[g + 1]):  # the counts this group touched, reset
            used[keys[i] // num_experts if per_layer else 0] = 0
    out_start[n_groups] = n
    return out_start, out_keys[:n], out_prio[:n]


def _asked_requests(system, prefetcher, trace, sched, groups, cache):
    """Any other trace-only prefetcher, asked at every (pass, MoE layer) in the DES's order."""
    from expertsim.policies.base import LayerObservation

    num_moe, num_experts = cache.num_layers, cache.num_experts
    counts, layers, experts, prios = [], [], [], []
    gstart = groups.start.tolist()
    gkeys = groups.keys
    trace_experts, phase = trace.experts, trace.phase
    current = None
    g = 0
    position = 0
    for it in range(len(sched.start)):
        a, b = int(sched.start[it]), int(sched.stop[it])
        request = int(sched.request[it])
        if request != current:
            current = request
            system.on_request_start(request)
        tokens = np.arange(a, b)
        for layer in range(num_moe):
            needed = gkeys[gstart[g]:gstart[g + 1]] - layer * num_experts
            obs = LayerObservation(0, it, layer, tokens, trace_experts[a:b, layer], None, needed, None, None, None,
                                   int(phase[a]), cache, trace, position)
            position += len(needed)
            requests = prefetcher.prefetch(obs)
            counts.append(len(requests))
            for r in requests:
                layers.append(r.layer)
                experts.append(r.expert)
                prios.append(r.priority)
            g += 1
    return (np.asarray(counts, dtype=np.int64), np.asarray(layers, dtype=np.int64),
            np.asarray(experts, dtype=np.int64), np.asarray(prios, dtype=np.int64))


def miss_rule(system, trace, sched, groups, cost):
    """How the kernel handles misses: (mode, rule_ok per access, gate_mass per access, cpu_ns by
    tokens, background). Mode 0: copy. Mode 1 (SkipMisses): a miss no token weighs above
    ``max_weight`` and, with ``keep_top1``, no token's first choice is skipped; the gate mass is
    the LayerServer's (the uses' weights summed in token order, or uses / k without weights).
    Mode 2 (CpuWhenCheaper): a miss whose tokens the CPU computes faster (or every miss) runs
    there, and is copied in the background with ``cache_after_cpu``. Mode 3
    (GateThresholdPrecision, HOBBIT): rule_ok is each access's level (2 full precision, 1 low,
    0 skipped: the highest :func:`~expertsim.policies.miss.cumulative_levels` of its uses)."""
    from expertsim.policies.miss import CpuWhenCheaper, GateThresholdPrecision, SkipMisses
    from expertsim.policies.systems import _DaopPlacement
    from expertsim.sim.fast.simulate import expert_times

    miss = system.miss
    none_b, none_f = np.zeros(0, dtype=np.bool_), np.zeros(0, dtype=np.float64)
    if type(miss) in (CpuWhenCheaper, _DaopPlacement):
        cpu_ns = expert_times(cost, groups.tokens, cost.cpu_expert_time_ns)
        cheaper = expert_times(cost, groups.tokens, miss.cpu_is_cheaper).astype(bool)
        return 2, cheaper[groups.tokens], none_f, cpu_ns, type(miss) is _DaopPlacement or bool(miss.cache_after_cpu)
    cpu_ns = np.zeros(1, dtype=np.int64)  # no CPU job
    if type(miss) not in (SkipMisses, GateThresholdPrecision):
        return 0, none_b, none_f, cpu_ns, False
    n, num_layers, k = trace.experts.shape
    num_experts = trace.num_experts
    # every use (token, layer, slot) -> its access: groups are (pass, layer), keys ascending
    pass_of = np.repeat(np.arange(len(sched.start)), sched.stop - sched.start)
    group = pass_of[:, None] * num_layers + np.arange(num_layers)[None, :]  # [tokens, layers]
    layer_of = np.asarray(groups.layer, dtype=np.int64)
    local = groups.keys - np.repeat(layer_of, np.diff(groups.start)) * num_experts
    combined = np.repeat(np.arange(len(layer_of)), np.diff(groups.start)) * num_experts + local
    use = np.searchsorted(combined, (group[:, :, None] * num_experts + trace.experts).ravel())
    if trace.weights is None:
        w = np.full(trace.experts.shape, 1.0 / k)
        mass = groups.tokens / k
    else:
        w = np.asarray(trace.weights, dtype=np.float64)
        mass = np.bincount(use, weights=w.ravel(), minlength=len(groups.keys))
    mass = np.asarray(mass, dtype=np.float64)
    if type(miss) is GateThresholdPrecision:  # cumulative_levels: by weight, descending (stable)
        order = np.argsort(-w, axis=2, kind="stable")
        w_sorted = np.take_along_axis(w, order, axis=2)
        before = np.cumsum(w_sorted, axis=2) - w_sorted
        lv = np.where(before < miss.full_threshold, 2, np.where(before < miss.low_threshold, 1, 0)).astype(np.int8)
        use_level = np.zeros(w.shape, dtype=np.int8)
        np.put_along_axis(use_level, order, lv, axis=2)
        level = np.zeros(len(groups.keys), dtype=np.int8)
        np.maximum.at(level, use, use_level.ravel())
        return 3, level, mass, cpu_ns, False
    heavy = np.zeros(len(groups.keys), dtype=bool)
    heavy[use[(w > miss.max_weight).ravel()]] = True
    if miss.keep_top1:
        first = np.zeros(trace.experts.shape, dtype=bool)
        np.put_along_axis(first, np.argmax(w, axis=2)[:, :, None], True, axis=2)
        heavy[use[first.ravel()]] = True
    return 1, ~heavy, mass, cpu_ns, False


def _plans(system, trace, sched, groups, cache):
    """The kernel's prefetch plans: [distances, groups + 1] starts, keys, priorities, and
    AdaptiveDistance's (initial, min, max distance, calm layers), zeros for a fixed one (its
    one plan, fitted here, unless a cross-layer allocator resizes the partitions during the run;
    the adaptive ones unfitted, one per distance; the kernel fits every plan with the slots of
    the moment), and None or a function giving every plan when some were left absent (starts
    -1: over the learned predictor only the initial distance's is made first; on a link that
    stalls at every layer the distance never moves, and two thirds of the predictions are not
    needed)."""
    from expertsim.policies.prefetch import AdaptiveDistance, LearnedPrefetch
    from expertsim.sim.fast import prefetch_plans as pp

    adapt = np.zeros(4, dtype=np.int64)
    outer = system.prefetcher
    if type(outer) is not AdaptiveDistance:  # fitted here unless an allocator will move the slots
        moves = system.allocator is not None and system.allocator.active
        start, keys, prio = prefetch_plan(system, trace, sched, groups, cache, trim=not moves)
        return start[None, :], keys, prio, adapt, None
    inner, d0 = outer.inner, outer.inner.distance  # d0: set by prepare (initial_distance)
    adapt[:] = d0, outer.min_distance, outer.max_distance, outer.calm_layers
    distances = range(outer.min_distance, outer.max_distance + 1)
    whole_passes = groups.num_groups == len(sched.start) * cache.num_layers
    if type(inner) is LearnedPrefetch and pp.learned_ok(inner) and whole_passes:  # each pair once
        found: dict = {}  # the initial distance's plan first (the others when the kernel moves to them)
        first = pp.learned_distance_plans(sched, trace, cache.num_layers, inner, distances, make={d0}, found=found)
        return (*first, adapt, lambda: pp.learned_distance_plans(sched, trace, cache.num_layers, inner, distances,
                                                                 found=found))
    starts, keys, prios, offset = [], [], [], 0
    try:
        for d in distances:
            inner.distance = d
            start, k, p = prefetch_plan(system, trace, sched, groups, cache, prefetcher=inner, trim=False)
            starts.append(start + offset)
            keys.append(k)
            prios.append(p)
            offset += len(k)
    finally:
        inner.distance = d0
    return np.stack(starts), np.concatenate(keys), np.concatenate(prios), adapt, None


def background_rank(system, trace, sched, groups, cache) -> np.ndarray:
    """Per access, the order of the CPU's expert among the layer's background copies (-1: none):
    CpuWhenCheaper's, ascending ids; DAOP's placement, at a prefill pass the layer's experts by
    tokens (most first, then the lowest id), the first ``slots`` of its partition."""
    from expertsim.policies.systems import _DaopPlacement

    if type(system.miss) is not _DaopPlacement:
        return (groups.keys % cache.num_experts).astype(np.int64)  # the expert id within its layer
    prefill = np.asarray(trace.phase)[np.asarray(sched.start)] == 0
    slots = (cache.capacity // max(cache.expert_bytes, 1)).astype(np.int64)
    return _daop_ranks(groups.start, groups.keys, groups.tokens, groups.layer, groups.pass_index, prefill, slots,
                       cache.num_partitions > 1)


@_njit
def _daop_ranks(gstart, keys, tokens, glayer, gpass, prefill, slots, per_layer):
    out = np.full(keys.shape[0], -1, dtype=np.int64)
    for g in range(glayer.shape[0]):
        if not prefill[gpass[g]]:
            continue
        limit = slots[glayer[g] if per_layer else 0]
        for i in range(gstart[g], gstart[g + 1]):  # np.argsort(-counts, kind="stable") position
            r = 0
            for j in range(gstart[g], gstart[g + 1]):  # keys ascending within a group: j < i is a lower id
                if tokens[j] > tokens[i] or (tokens[j] == tokens[i] and j < i):
                    r += 1
            if r < limit:
                out[i] = r
    return out


def _inner(prefetcher):
    from expertsim.policies.systems import _AutoSpeculation

    return prefetcher.inner if type(prefetcher) is _AutoSpeculation else prefetcher


def _asks(prefetcher) -> bool:
    from expertsim.policies.prefetch import Prefetcher

    return type(_inner(prefetcher)) is not Prefetcher


def simulate(model, hardware, system, cache_config, trace, options):
    """The fast engine's RunResult for a run :func:`supports_simulation` accepts."""
    from expertsim.policies import RunContext
    from expertsim.policies.allocation import proportional_slots
    from expertsim.policies.records import RunTotals
    from expertsim.sim.fast import prefetching as k
    from expertsim.sim.fast.belady import _belady_misses
    from expertsim.sim.fast.simulate import batch1_result, batch1_start, dense_times, expert_times
    from expertsim.sim.fast.timing import _bounds_metrics

    start = batch1_start(model, hardware, system, cache_config, trace, options, top_k=model.top_k)
    setup, memory, cache, sched, groups, wall0 = (start.setup, start.memory, start.cache, start.sched, start.groups,
                                                  start.wall0)
    m, opts, cost = model, options, setup.cost
    plain, system = system, as_composed(system)
    # no access plan: LRU, FIFO and the trace-only prefetchers never read it (Belady does)
    system.prepare(RunContext(model=m, hardware=hardware, cost=cost, cache=cache, trace=trace, plan=None))
    pf_start, pf_key, pf_prio, adapt, every_plan = _plans(system, trace, sched, groups, cache)
    alloc = np.zeros(2, dtype=np.int64)  # CrossLayerAllocator: interval, min slots (0: none)
    if system.allocator is not None and system.allocator.active:
        alloc[:] = system.allocator.interval, system.allocator._min
        if len(sched.start) >= alloc[0]:  # its first split raises in the DES when the slots fall short
            proportional_slots(int((cache.capacity // cache.expert_bytes).sum()), np.zeros(cache.num_layers),
                               int(alloc[1]), cache.num_experts)
    cap, per_layer = np.asarray(cache.capacity, dtype=np.int64), cache.num_partitions > 1  # bytes
    expert_ns = expert_times(cost, groups.tokens)
    dense = dense_times(cost, sched)
    moe_of_layer = np.full(m.num_layers, -1, dtype=np.int64)
    moe_of_layer[np.asarray(m.moe_layers, dtype=np.int64)] = np.arange(m.num_moe_layers)
    expert_bytes = m.expert_bytes()
    copy_ns = cost.copy_overhead_ns(expert_bytes) + cost.copy_wire_ns(expert_bytes)
    lowp = system.low_precision_dtype  # HOBBIT's low-precision copies (mode 3)
    low_bytes = m.expert_bytes(lowp)
    copy_ns_low = cost.copy_overhead_ns(low_bytes) + cost.copy_wire_ns(low_bytes)
    kind = system_kind(system)
    miss_mode, rule_ok, gate_mass, cpu_ns, background = miss_rule(system, trace, sched, groups, cost)
    level = np.zeros(0, dtype=np.int8)
    if miss_mode == 3:  # the levels travel apart from the skip / CPU rule
        level, rule_ok = rule_ok, np.zeros(0, dtype=np.bool_)
    expert_ns_low = expert_times(cost, groups.tokens, lambda t: cost.expert_time_ns(t, low_precision_dtype=lowp)) \
        if miss_mode == 3 else np.zeros(1, dtype=np.int64)
    initial = np.asarray(system.initial_residents(m), dtype=np.int64)  # after prepare, as the DES
    request = np.asarray(sched.request)
    new_request = np.ones(len(request), dtype=np.bool_)  # the passes where on_request_start runs
    new_request[1:] = request[1:] != request[:-1]
    g_keys, g_tokens = groups.keys.astype(np.int64), groups.tokens.astype(np.int64)
    hot = system.eviction.counts.astype(np.float64) if kind == "static" else np.zeros(0, dtype=np.float64)
    bg_rank = background_rank(system, trace, sched, groups, cache) if background else np.zeros(0, np.int64)

    def run(pf_start, pf_key, pf_prio):  # a copy of the capacities each: the allocator moves them
        return k.simulate_kernel(
            m.num_layers, moe_of_layer, dense, groups.start, g_keys, g_tokens, pf_start, pf_key, pf_prio, per_layer,
            cap.copy(), kind != "fifo", kind == "lru",  # recency; LRU.on_predicted
            m.num_experts, expert_ns, copy_ns, cost.host_layer_ns, cost.host_expert_ns, setup.runtime.serialises_copies,
            opts.link_queue == "fifo", expert_bytes, miss_mode, rule_ok, gate_mass, cpu_ns, background,
            system.expert_order == "cache-aware", COPY_ROWS, hot, initial, low_bytes, copy_ns_low, expert_ns_low,
            level, {"priority": 1, "sequence": 2}.get(kind, 0), new_request, bg_rank,
            cost.transfer_time_ns(expert_bytes) if setup.runtime.writeback else 0, adapt, alloc)

    begin, end, hits, misses, stall, experts, tot, err, dropped_mass, degraded_mass = run(pf_start, pf_key, pf_prio)
    if err == -2:  # the distance moved to a plan not made: every plan, and the run again from the start
        begin, end, hits, misses, stall, experts, tot, err, dropped_mass, degraded_mass = run(*every_plan())
    if err >= 0:
        layer = int(groups.layer[err])
        raise ConfigError(f"layer {layer}: cannot make room for an expert: the cache partition is smaller than one "
                          f"expert ({expert_bytes} bytes); give it more room")
    totals = RunTotals(h2d_bytes=int(tot[k.T_H2D]), copies=int(tot[k.T_COPIES]),
                       prefetch_copies=int(tot[k.T_PF_COPIES]), cancelled_prefetches=int(tot[k.T_CANCELLED]),
                       prefetch_admitted=int(tot[k.T_PF_ADMITTED]), prefetch_hits=int(tot[k.T_PF_HITS]),
                       stall_ns=int(tot[k.T_STALL]), expert_compute_ns=int(tot[k.T_EXPERT]),
                       dense_compute_ns=int(tot[k.T_DENSE]), dropped_gate_mass=float(dropped_mass),
                       degraded_gate_mass=float(degraded_mass),
                       cpu_ns=int(tot[k.T_CPU_NS]), cpu_experts=int(tot[k.T_CPU_EXPERTS]),
                       d2h_bytes=int(tot[k.T_D2H]))
    extra = {}
    if opts.bounds:
        misses_belady = _belady_misses(m, groups, setup.cache_config, initial)
        # compute-only: every needed expert computed (the skipped ones too), as bounds.compute_bound_ns
        extra = _bounds_metrics(cost, m, misses_belady, dense_total_ns=totals.dense_compute_ns,
                                expert_total_ns=int(expert_ns[groups.tokens].sum()),
                                copy_chunk_bytes=opts.copy_chunk_bytes)
    return batch1_result(model=m, hardware=hardware, system=plain, cache_config=setup.cache_config, trace=trace,
                         options=opts, cost=cost, sched=sched, begin=begin, end=end, hits=hits, misses=misses,
                         stall=stall, experts=experts, totals=totals, memory=memory,
                         peak_bytes=int(tot[k.T_PEAK]), extra=extra, wall0=wall0)
