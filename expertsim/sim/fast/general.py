"""The fast engine for every eviction policy: the real cache once, then the compiled timing.

At batch 1 with copy on miss, no prefetch and one copy engine, a run's timing depends on the
cache only through two arrays per access (in the access groups' order, see
:class:`~expertsim.sim.fast.groups.AccessGroups`): whether the lookup hit, and which earlier item's
compute a copy waits for (``release``: the room it reuses was freed mid-layer). Hits and
evictions never depend on time (the :class:`~expertsim.policies.cache.ExpertCache` changes only
at logical points), so the two arrays can be computed first, by the very objects the DES drives:
the system's :class:`~expertsim.policies.cache.ExpertCache` and
:class:`~expertsim.policies.serve.LayerServer`, walked layer by layer with no timing
(:func:`expertsim.sim.cache_replay.serve_layers`). The timing kernels of
:mod:`expertsim.sim.fast.timing` then turn them into the run's records. LRU and FIFO keep their compiled
cache kernels; every other eviction policy takes this path, about one Python serve per (pass,
MoE layer), without SimPy's events.

Exactness holds because the DES's own decisions at each layer are a function of the same
inputs in the same order: the iterations (the batcher's dry run, as the DES plans them for
oracles), the request starts, the observations' routing and the cache's state. The one input
this path does not have is time: observations carry ``now_ns=0`` and the layer's feedback no
times. None of the built-in eviction policies reads either. A plug-in eviction policy runs here
only when it cannot see time either: its class leaves ``on_layer`` (the one hook that receives
an observation) as :class:`~expertsim.policies.EvictionPolicy` defines it; one that overrides it
runs on the DES, whose observations carry the simulated time.
"""
from __future__ import annotations

import numpy as np

from expertsim.errors import ConfigError
from expertsim.sim.fast import support
from expertsim.sim.fast.simulate import simulate_fast



def _builtin_eviction(cls) -> bool:
    from expertsim.policies.registration import EVICTION

    return cls.__module__ == "expertsim.policies.eviction" and EVICTION.get(getattr(cls, "name", None)) is cls


def eviction_kind(system) -> str | None:
    """'builtin' when ``system`` is the base System over a built-in eviction policy, 'plugin'
    when over a user's eviction policy that cannot read time (see the module docstring), else
    None (any other system: the DES)."""
    from expertsim.policies.base import EvictionPolicy, System

    eviction = getattr(system, "eviction", None)
    if type(system) is not System or not isinstance(eviction, EvictionPolicy):
        return None
    for hook in support.SYSTEM_HOOKS:  # the base System's must all be in place (an eviction-only run)
        if getattr(type(system), hook) is not getattr(System, hook):
            return None
    cls = type(eviction)
    if _builtin_eviction(cls):
        return "builtin"
    if cls.on_layer is EvictionPolicy.on_layer:
        return "plugin"
    return None


def supports_simulation(system, cache_config, options, *, model=None, hardware=None) -> bool:
    """True when :func:`simulate` reproduces the SimPy engine exactly: what
    :func:`expertsim.sim.fast.support.supports_simulation` accepts, and the base System over any eviction
    policy :func:`eviction_kind` accepts, under the same run conditions (batch 1, closed or
    offline arrivals, whole-expert copies on one copy engine, no timeline, no storage tier)."""
    if support.supports_simulation(system, cache_config, options, model=model, hardware=hardware):
        return True
    return eviction_kind(system) is not None and support.run_supported(system, cache_config, options, model=model,
                                                                    hardware=hardware)


def simulate(model, hardware, system, cache_config, trace, options):
    """The fast engine's RunResult for any run :func:`supports_simulation` accepts: the compiled
    LRU/FIFO path where it applies, else the general cache pass (:func:`general_cache_pass`)."""
    if support.supports_simulation(system, cache_config, options, model=model, hardware=hardware):
        return simulate_fast(model, hardware, system, cache_config, trace, options)
    if not supports_simulation(system, cache_config, options, model=model, hardware=hardware):
        raise ConfigError(
            f"the fast engine does not support policy {system.label!r} with these options (it runs the base "
            f"system with any eviction policy whose hooks do not read time, no-cache and all-on-gpu, at "
            f"batch 1, closed or offline arrivals, whole-expert copies on one copy engine, no timeline); "
            f"use --engine des"
        )
    return simulate_fast(model, hardware, system, cache_config, trace, options, cache_pass=general_cache_pass)


def general_cache_pass(setup, trace, groups):
    """(hit, release, peak_cache_bytes) of a run, per access in ``groups``' order, from the
    system's own ExpertCache and LayerServer, set up as :meth:`Simulation.run` sets them up."""
    from expertsim.policies import ExpertCache, RunContext
    from expertsim.policies.serve import LayerServer
    from expertsim.sim.cache_replay import serve_layers
    from expertsim.sim.batching import arrival_times_ns, plan_iterations
    from expertsim.sim.workload import build_access_plan

    m, opts, system = setup.model, setup.options, setup.system
    cache = ExpertCache(m.num_moe_layers, m.num_experts, m.expert_bytes(), setup.cache_config, system.eviction,
                        top_k=m.top_k)
    arrivals = arrival_times_ns(len(trace.request_starts()) - 1, opts.arrival, rate_per_s=opts.rate_per_s,
                                seed=opts.seed, timestamps_ns=opts.arrival_times_ns)
    iterations = plan_iterations(trace, max_batch=1, prefill_chunk_tokens=opts.prefill_chunk_tokens,
                                 arrivals_ns=arrivals)
    plan = build_access_plan(trace, iterations, m.num_experts)
    system.prepare(RunContext(model=m, hardware=setup.hardware, cost=setup.cost, cache=cache, trace=trace,
                              plan=plan))
    cache.preload(np.asarray(system.initial_residents(m), dtype=np.int64))
    server = LayerServer(system, cache, m.expert_bytes(), m.expert_bytes(system.low_precision_dtype))
    n = len(groups.keys)
    hit = np.zeros(n, dtype=np.bool_)
    release = np.full(n, -1, dtype=np.int32)
    start = groups.start.tolist()
    g = 0
    for _, _, layer_plan in serve_layers(iterations, trace, system, cache, server, scope=opts.scope):
        a = start[g]
        # Group g's keys are the layer's needed experts ascending: item e sits at a + its rank.
        needed = sorted(item.expert for item in layer_plan.items)
        rank = {e: i for i, e in enumerate(needed)}
        for item in layer_plan.items:
            j = a + rank[item.expert]
            hit[j] = item.hit
            release[j] = item.wait_compute
        g += 1
    if g != groups.num_groups:  # pragma: no cover - the schedule and the batcher agree by construction
        raise RuntimeError(f"general cache pass served {g} layers, the access groups have {groups.num_groups}")
    return hit, release, int(cache.peak_used_bytes)
