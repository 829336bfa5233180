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

import time

import numpy as np

from expertsim.errors import ConfigError


def _trace_only_prefetchers() -> tuple:
    from expertsim.policies.prefetch import (
        LayerRingPrefetch,
        LearnedPrefetch,
        ModelledSpeculation,
        PregatedPrefetch,
        Prefetcher,
        SpeculativePrefetch,
    )

    return (Prefetcher, PregatedPrefetch, ModelledSpeculation, SpeculativePrefetch, LayerRingPrefetch,
            LearnedPrefetch)


def _prefetcher_ok(prefetcher) -> bool:
    from expertsim.policies.systems import _AutoSpeculation

    if type(prefetcher) is _AutoSpeculation:  # resolved at prepare to one of the trace-only ones
        return True
    return type(prefetcher) in _trace_only_prefetchers()


def system_kind(system) -> str | None:
    """'lru' or 'fifo' when ``system`` is a composed system the kernel reproduces: LRU or FIFO
    eviction, copy on miss, the FIFO scheduler, hits-first serve order, no cross-layer allocator,
    a trace-only prefetcher, and no hook of its own beyond ComposedSystem's; else None."""
    from expertsim.policies.base import System
    from expertsim.policies.eviction import FIFO, LRU
    from expertsim.policies.miss import MissHandler
    from expertsim.policies.scheduling import FifoScheduler
    from expertsim.policies.systems import ComposedSystem
    from expertsim.sim.fast.support import SYSTEM_HOOKS

    if not isinstance(system, ComposedSystem):
        return None
    for hook in SYSTEM_HOOKS:
        mine = getattr(type(system), hook)
        if mine is not getattr(ComposedSystem, hook) and mine is not getattr(System, hook):
            return None
    if type(system.miss) is not MissHandler or type(system.scheduler) is not FifoScheduler:
        return None
    if system.expert_order != "hits-first" or system.allocator is not None:
        return None
    if not _prefetcher_ok(system.prefetcher):
        return None
    if type(system.eviction) is LRU:
        return "lru"
    if type(system.eviction) is FIFO:
        return "fifo"
    return None


def supports_simulation(system, cache_config, options, *, model=None, hardware=None) -> bool:
    """True when :func:`simulate` reproduces the DES: a system :func:`system_kind` accepts, under
    the fast engine's run conditions (batch 1, closed or offline arrivals, one copy engine,
    whole-expert copies, no storage tier, no timeline, no write-back), the cache kept across
    requests."""
    from expertsim.sim.fast import support

    if system_kind(system) is None or options.scope != "global":
        return False
    return support.run_supported(system, cache_config, options, model=model, hardware=hardware)


def prefetch_plan(system, trace, sched, groups, cache):
    """Every (pass, MoE layer)'s prefetch requests, as the system makes and trims them in the DES:
    (start[groups + 1], keys, priorities). ``system`` is prepared; ``cache`` (empty) gives the
    sizes the trimming reads."""
    from expertsim.policies.base import LayerObservation

    num_moe, num_experts = cache.num_layers, cache.num_experts
    prefetcher = system.prefetcher
    if not _asks(prefetcher):  # no prefetch at all
        return np.zeros(len(groups.layer) + 1, dtype=np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts, keys, prios = [0], [], []
    gstart = groups.start.tolist()
    gkeys = groups.keys
    experts = trace.experts
    phase = trace.phase
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
            obs = LayerObservation(0, it, layer, tokens, experts[a:b, layer], None, needed, None, None, None,
                                   int(phase[a]), cache, trace, position)
            position += len(needed)
            for r in system.fit_prefetches(obs, prefetcher.prefetch(obs)):
                if not (0 <= r.layer < num_moe and 0 <= r.expert < num_experts):
                    raise ConfigError(
                        f"system {system.name!r} asked to prefetch (layer {r.layer}, expert {r.expert}), outside "
                        f"{num_moe} layers x {num_experts} experts")
                keys.append(r.layer * num_experts + r.expert)
                prios.append(int(r.priority))
            starts.append(len(keys))
            g += 1
    return np.asarray(starts, dtype=np.int64), np.asarray(keys, dtype=np.int64), np.asarray(prios, dtype=np.int64)


def _asks(prefetcher) -> bool:
    from expertsim.policies.prefetch import Prefetcher
    from expertsim.policies.systems import _AutoSpeculation

    inner = prefetcher.inner if type(prefetcher) is _AutoSpeculation else prefetcher
    return type(inner) is not Prefetcher


def simulate(model, hardware, system, cache_config, trace, options):
    """The fast engine's RunResult for a run :func:`supports_simulation` accepts."""
    from expertsim.policies import ExpertCache, RunContext
    from expertsim.policies.records import RunTotals
    from expertsim.sim.batching import plan_iterations
    from expertsim.sim.fast import prefetching as k
    from expertsim.sim.fast.belady import _belady_misses
    from expertsim.sim.fast.groups import _capacity_slots, groups_from_passes
    from expertsim.sim.fast.simulate import _batch1_schedule, _request_records
    from expertsim.sim.fast.timing import _bounds_metrics
    from expertsim.sim.metrics import summarise
    from expertsim.sim.setup import RunSetup
    from expertsim.sim.workload import build_access_plan

    wall0 = time.perf_counter()
    setup = RunSetup(model, hardware, system, cache_config, options=options)
    m, opts, cost = model, options, setup.cost
    trace.check_model(m)
    memory = setup.memory_check(int(trace.position.max()) + 1 if trace.num_tokens else 1)
    cache = ExpertCache(m.num_moe_layers, m.num_experts, m.expert_bytes(), setup.cache_config, system.eviction,
                        top_k=m.top_k)  # the DES's size checks and messages
    sched = _batch1_schedule(trace, opts.prefill_chunk_tokens)
    groups = groups_from_passes(trace.experts, np.append(sched.start, trace.num_tokens), m.num_experts)
    iterations = plan_iterations(trace, max_batch=1, prefill_chunk_tokens=opts.prefill_chunk_tokens)
    system.prepare(RunContext(model=m, hardware=hardware, cost=cost, cache=cache, trace=trace,
                              plan=build_access_plan(trace, iterations, m.num_experts)))
    pf_start, pf_key, pf_prio = prefetch_plan(system, trace, sched, groups, cache)
    cap, per_layer = _capacity_slots(setup.cache_config, m.num_moe_layers, m.num_experts, m.expert_bytes())
    expert_ns = np.zeros(int(groups.tokens.max()) + 1 if len(groups.tokens) else 1, dtype=np.int64)
    for t in np.flatnonzero(np.bincount(groups.tokens)).tolist():
        expert_ns[t] = cost.expert_time_ns(t)
    ntok = sched.stop - sched.start
    span = int(sched.context.max()) + 1 if len(ntok) else 1
    pairs, inverse = np.unique(ntok * span + sched.context, return_inverse=True)
    dense = np.asarray(cost.dense_layer_times_ns(pairs // span, pairs % span), dtype=np.int64)[inverse.ravel()]
    moe_of_layer = np.full(m.num_layers, -1, dtype=np.int64)
    moe_of_layer[np.asarray(m.moe_layers, dtype=np.int64)] = np.arange(m.num_moe_layers)
    expert_bytes = m.expert_bytes()
    copy_ns = cost.copy_overhead_ns(expert_bytes) + cost.copy_wire_ns(expert_bytes)
    kind = system_kind(system)
    begin, end, hits, misses, stall, experts, tot, err, _layer_starts = k.simulate_kernel(
        m.num_layers, moe_of_layer, dense, groups.start, groups.keys.astype(np.int64), groups.tokens.astype(np.int64),
        pf_start, pf_key, pf_prio, per_layer, cap, kind == "lru", kind == "lru",  # LRU.on_predicted; FIFO ignores it
        m.num_experts, expert_ns, copy_ns, cost.host_layer_ns, cost.host_expert_ns, setup.runtime.serialises_copies,
        opts.link_queue == "fifo", expert_bytes)
    if err >= 0:
        layer = int(groups.layer[err])
        raise ConfigError(f"layer {layer}: cannot make room for an expert: the cache partition is smaller than one "
                          f"expert ({expert_bytes} bytes); give it more room")
    decode_cum = np.concatenate([[0], np.cumsum(trace.phase == 1)])
    columns = {"iteration": np.arange(len(ntok), dtype=np.int64), "request": sched.request.astype(np.int64),
               "requests": np.ones(len(ntok), dtype=np.int64), "phase": sched.phase, "tokens": ntok,
               "decode_tokens": decode_cum[sched.stop] - decode_cum[sched.start], "start_ns": begin, "end_ns": end,
               "hits": hits, "misses": misses, "stall_ns": stall, "experts": experts}
    requests, latencies = _request_records(sched, begin, end, opts.arrival)
    max_kv = int(sched.context.max()) if len(ntok) else 0
    memory["kv_bytes"] = max(memory["kv_bytes"], int(round(m.kv_bytes_per_token_stored * max_kv)))
    totals = RunTotals(h2d_bytes=int(tot[k.T_H2D]), copies=int(tot[k.T_COPIES]),
                       prefetch_copies=int(tot[k.T_PF_COPIES]), cancelled_prefetches=int(tot[k.T_CANCELLED]),
                       prefetch_admitted=int(tot[k.T_PF_ADMITTED]), prefetch_hits=int(tot[k.T_PF_HITS]),
                       stall_ns=int(tot[k.T_STALL]), expert_compute_ns=int(tot[k.T_EXPERT]),
                       dense_compute_ns=int(tot[k.T_DENSE]))
    extra = {}
    if opts.bounds:
        misses_belady = _belady_misses(m, groups, setup.cache_config, np.zeros(0, dtype=np.int64))
        extra = _bounds_metrics(cost, m, misses_belady, dense_total_ns=totals.dense_compute_ns,
                                expert_total_ns=totals.expert_compute_ns, copy_chunk_bytes=opts.copy_chunk_bytes)
    result = summarise(
        model=m, hardware=hardware, system=system, cache_config=setup.cache_config, trace=trace,
        columns=columns, totals=totals, timeline=None, memory=memory, cost=cost, scope=opts.scope,
        peak_cache_bytes=int(tot[k.T_PEAK]) * expert_bytes, engine="fast", requests=requests,
        decode_latencies_ns=latencies, serving=opts.serving_summary(), extra=extra,
    )
    result.metrics["wall_s"] = time.perf_counter() - wall0
    return result
