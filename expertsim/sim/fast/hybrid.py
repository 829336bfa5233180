"""The fast engine for the hybrid CPU/GPU systems (KTransformers, llama.cpp; :mod:`expertsim.policies.hybrid`).

Their GPU experts are a fixed set, preloaded and never evicted; every other expert a pass needs
is computed on the host CPU (one job per layer) or, for a pass of at least ``stream_min_tokens``
tokens, streamed to the GPU in one copy per layer. Nothing carries from one layer to the next
(the layer waits for its CPU job and its stream), so each (pass, MoE layer) takes, from its start,
with ``h`` the GPU compute of its resident experts, ``s`` that of its streamed ones, ``D_s`` the
stream's copy and ``D_cpu`` the CPU job, as the DES orders them (hits first, then the streamed
experts once their copy landed, then the wait for the CPU job):

    a = max(h, D_s) + s  (h without a stream);   duration = max(a, D_cpu);
    stall = max(0, D_s - h) + max(0, D_cpu - a)

computed for every layer at once from the access groups with the DES's cost functions.
"""
from __future__ import annotations


import numpy as np


def supports_simulation(system, cache_config, options, *, model=None, hardware=None) -> bool:
    """A built-in hybrid system under the fast engine's run conditions (batch 1, closed or offline
    arrivals, one copy engine, whole copies, no storage tier, no timeline), on a runtime whose
    copies do not wait on the compute stream, the cache kept across requests."""
    from expertsim.policies.hybrid import KTransformers, LlamaCpp
    from expertsim.sim.cost import runtime_for
    from expertsim.sim.fast import support

    if type(system) not in (KTransformers, LlamaCpp) or options.scope != "global":
        return False
    if runtime_for(system, options.runtime).serialises_copies:
        return False
    return support.run_supported(system, cache_config, options, model=model, hardware=hardware)


def simulate(model, hardware, system, cache_config, trace, options):
    """The fast engine's RunResult for a run :func:`supports_simulation` accepts."""
    from expertsim.policies import RunContext
    from expertsim.policies.records import RunTotals
    from expertsim.sim.fast.belady import _belady_misses
    from expertsim.sim.fast.simulate import batch1_result, batch1_start, dense_times, expert_times
    from expertsim.sim.fast.timing import _bounds_metrics

    # the DES's cache checks with no top-k floor (a hybrid system copies no miss into its cache)
    start = batch1_start(model, hardware, system, cache_config, trace, options, top_k=0)
    setup, memory, cache, sched, groups, wall0 = (start.setup, start.memory, start.cache, start.sched, start.groups,
                                                  start.wall0)
    m, opts, cost = model, options, setup.cost
    system.prepare(RunContext(model=m, hardware=hardware, cost=cost, cache=cache, trace=trace, plan=None))
    initial = np.asarray(system.initial_residents(m), dtype=np.int64)
    n_groups, n_pass = groups.num_groups, len(sched.start)
    resident = np.zeros(m.num_moe_layers * m.num_experts, dtype=bool)
    resident[initial] = True
    group_of = np.repeat(np.arange(n_groups), np.diff(groups.start))
    tokens = groups.tokens.astype(np.int64)
    hit = resident[groups.keys]
    ntok = sched.stop - sched.start
    streams = np.repeat(bool(system.stream_ok_) & (ntok >= system.stream_min_tokens), m.num_moe_layers)[group_of]
    expert_ns, cpu_ns = expert_times(cost, tokens), expert_times(cost, tokens, cost.cpu_compute_ns)

    def per_group(values):
        return np.bincount(group_of, weights=values, minlength=n_groups).astype(np.int64) if len(values) \
            else np.zeros(n_groups, dtype=np.int64)

    h = per_group(np.where(hit, expert_ns[tokens], 0))
    streamed = ~hit & streams
    on_cpu = ~hit & ~streams
    s = per_group(np.where(streamed, expert_ns[tokens], 0))
    n_streamed, n_cpu = per_group(streamed.astype(np.int64)), per_group(on_cpu.astype(np.int64))
    # the stream: one copy of the layer's streamed experts; the CPU job: activations both ways once,
    # the experts one after another, the runtime's hand-over (cost.cpu_layer_time_ns)
    d_s = np.zeros(n_groups, dtype=np.int64)
    for n in np.unique(n_streamed[n_streamed > 0]).tolist():
        d_s[n_streamed == n] = cost.transfer_time_ns(n * m.expert_bytes())
    layer_tokens = np.repeat(ntok, m.num_moe_layers)
    act = np.zeros(n_groups, dtype=np.int64)
    for n in np.unique(layer_tokens[n_cpu > 0]).tolist():
        act[(layer_tokens == n) & (n_cpu > 0)] = 2 * cost.activation_copy_ns(n)
    d_cpu = np.where(n_cpu > 0, act + per_group(np.where(on_cpu, cpu_ns[tokens], 0)) + cost.cpu_sync_layer_ns, 0)
    a = np.where(n_streamed > 0, np.maximum(h, d_s) + s, h)
    duration = np.maximum(a, d_cpu)
    stall = np.where(n_streamed > 0, np.maximum(d_s - h, 0), 0) + np.maximum(d_cpu - a, 0)
    # passes: dense layers, then the MoE layers
    dense = dense_times(cost, sched)
    by_pass = lambda v: np.bincount(groups.pass_index, weights=v, minlength=n_pass).astype(np.int64)  # noqa: E731
    iter_ns = dense * m.num_layers + by_pass(duration)
    end = np.cumsum(iter_ns)
    begin = end - iter_ns
    hits_it, all_it = by_pass(per_group(hit.astype(np.int64))), by_pass(np.diff(groups.start))
    totals = RunTotals(h2d_bytes=int(n_streamed.sum()) * m.expert_bytes(), copies=int((n_streamed > 0).sum()),
                       stall_ns=int(stall.sum()), expert_compute_ns=int(h.sum() + s.sum()),
                       dense_compute_ns=int(dense.sum()) * m.num_layers, cpu_ns=int(d_cpu.sum()),
                       cpu_experts=int(n_cpu.sum()))
    extra = {}
    if opts.bounds:
        extra = _bounds_metrics(cost, m, _belady_misses(m, groups, setup.cache_config, initial),
                                dense_total_ns=totals.dense_compute_ns,
                                expert_total_ns=int(expert_ns[tokens].sum()), copy_chunk_bytes=opts.copy_chunk_bytes)
    return batch1_result(model=m, hardware=hardware, system=system, cache_config=setup.cache_config, trace=trace,
                         options=opts, cost=cost, sched=sched, begin=begin, end=end, hits=hits_it,
                         misses=all_it - hits_it,
                         stall=by_pass(stall), experts=all_it, totals=totals, memory=memory,
                         peak_bytes=len(initial) * m.expert_bytes(), extra=extra, wall0=wall0)
