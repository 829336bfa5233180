"""The fast engine's timed run: :func:`simulate_fast` plans the batch-1 schedule, replays the
cache (the LRU/FIFO kernels, or a caller's cache pass), times the groups and summarises the
run into the same :class:`~expertsim.sim.metrics.RunResult` as the DES.
"""
from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np

from expertsim.errors import ConfigError
from expertsim.policies.records import RunTotals
from expertsim.sim.fast.belady import _belady_misses
from expertsim.sim.fast.groups import _capacity_slots, groups_from_passes
from expertsim.sim.fast.jit import HAVE_NUMBA
from expertsim.sim.fast.lru import run_lru
from expertsim.sim.fast.support import _builtin_kind, supports_simulation
from expertsim.sim.fast.timing import _bounds_metrics, _resident_timing, _serial_timing, _timing_kernel


@dataclasses.dataclass
class _Schedule:
    """Batch-1 iterations as arrays (the ContinuousBatcher's order: requests in trace order, each
    request's passes in order, prefill passes cut into chunks)."""

    start: np.ndarray  # first trace row of each iteration
    stop: np.ndarray
    request: np.ndarray
    phase: np.ndarray  # phase of the iteration's first row
    context: np.ndarray  # KV length after the iteration
    decode_pass: np.ndarray  # the iteration belongs to a decode pass (its tokens' TPOT counts)
    ends_pass: np.ndarray  # last chunk of its pass


def _batch1_schedule(trace, chunk: int | None) -> _Schedule:
    starts = trace.pass_starts()
    a, b = starts[:-1], starts[1:]
    pieces = np.ones(len(a), dtype=np.int64)
    if chunk is not None:
        prefill = trace.phase[a] == 0
        pieces[prefill] = -(-(b[prefill] - a[prefill]) // int(chunk))
    first = np.repeat(a, pieces)
    piece = np.arange(int(pieces.sum())) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    start = first + piece * (int(chunk) if chunk is not None else 0)
    stop = np.repeat(b, pieces)
    if chunk is not None:  # only prefill passes are chunked
        stop = np.where(trace.phase[start] == 0, np.minimum(stop, start + int(chunk)), stop)
    return _Schedule(start=start, stop=stop, request=trace.request[start], phase=trace.phase[start].astype(np.int64),
                     context=trace.position[stop - 1] + 1, decode_pass=np.repeat(trace.phase[a] == 1, pieces),
                     ends_pass=piece == np.repeat(pieces, pieces) - 1)


@dataclasses.dataclass
class Batch1Start:
    """What every batch-1 fast path sets up first (:func:`batch1_start`)."""

    setup: object  # RunSetup: cost model, cache size, runtime
    memory: dict  # the memory check's figures (the run's KV is added at the end)
    cache: object  # an empty ExpertCache of the run's size (the DES's checks and messages passed)
    sched: _Schedule
    groups: object  # AccessGroups of the schedule's passes
    wall0: float


def batch1_start(model, hardware, system, cache_config, trace, options, *, top_k: int) -> Batch1Start:
    """The set-up every batch-1 fast path shares: the run's specs and cost model, the trace and
    memory checks, an ExpertCache of the run's size (built as the DES builds it, so a size it
    refuses is refused with the same message; ``top_k`` its floor), the schedule and its access
    groups."""
    from expertsim.policies.cache import ExpertCache
    from expertsim.sim.setup import RunSetup

    wall0 = time.perf_counter()
    setup = RunSetup(model, hardware, system, cache_config, options=options)
    trace.check_model(model)
    memory = setup.memory_check(int(trace.position.max()) + 1 if trace.num_tokens else 1)
    cache = ExpertCache(model.num_moe_layers, model.num_experts, model.expert_bytes(), setup.cache_config,
                        system.eviction, top_k=top_k)
    sched = _batch1_schedule(trace, options.prefill_chunk_tokens)
    groups = groups_from_passes(trace.experts, np.append(sched.start, trace.num_tokens), model.num_experts)
    return Batch1Start(setup, memory, cache, sched, groups, wall0)


def expert_times(cost, tokens: np.ndarray, time_of=None) -> np.ndarray:
    """``time_of(t)`` (default: a GPU expert's time) for every token count in ``tokens``, as a
    table indexed by the count."""
    time_of = time_of or cost.expert_time_ns
    table = np.zeros(int(tokens.max()) + 1 if len(tokens) else 1, dtype=np.int64)
    for t in np.flatnonzero(np.bincount(tokens)).tolist() if len(tokens) else []:
        table[t] = time_of(t)
    return table


def dense_times(cost, sched: _Schedule) -> np.ndarray:
    """One dense layer's time for every iteration of ``sched`` (once per distinct tokens and
    context)."""
    ntok = sched.stop - sched.start
    span = int(sched.context.max()) + 1 if len(ntok) else 1
    pairs, inverse = np.unique(ntok * span + sched.context, return_inverse=True)  # (tokens, context) pairs
    return np.asarray(cost.dense_layer_times_ns(pairs // span, pairs % span), dtype=np.int64)[inverse.ravel()]


def _request_records(sched: _Schedule, begin: np.ndarray, end: np.ndarray, arrival: str):
    """The batcher's per-request records and per-token decode latencies at batch 1."""
    change = np.ones(len(sched.request), dtype=bool)
    change[1:] = sched.request[1:] != sched.request[:-1]
    first_it = np.flatnonzero(change)
    last_it = np.append(first_it[1:], len(change)) - 1
    finish = end[last_it]
    if arrival == "closed":
        arrivals = np.concatenate([[0], finish[:-1]])
    else:  # offline: everything queued at 0
        arrivals = np.zeros(len(first_it), dtype=np.int64)
    req_of_it = np.cumsum(change) - 1
    # First token: the end of the request's first pass (its last chunk).
    pass_end_its = np.flatnonzero(sched.ends_pass)
    first_pass_end = np.full(len(first_it), -1, dtype=np.int64)
    first_pass_end[req_of_it[pass_end_its][::-1]] = pass_end_its[::-1]
    dur = end - begin
    ntok = sched.stop - sched.start
    lat_it = np.flatnonzero(sched.decode_pass)
    latencies = np.repeat(dur[lat_it], ntok[lat_it])
    lat_req = np.repeat(req_of_it[lat_it], ntok[lat_it])
    bounds = np.searchsorted(lat_req, np.arange(len(first_it) + 1))
    records = []
    for i in range(len(first_it)):
        mine = latencies[bounds[i]:bounds[i + 1]]
        records.append({"request": int(sched.request[first_it[i]]), "arrival_ns": int(arrivals[i]),
                        "start_ns": int(begin[first_it[i]]), "first_token_ns": int(end[first_pass_end[i]]),
                        "finish_ns": int(finish[i]), "decode_tokens": len(mine),
                        "tpot_ns": float(np.mean(mine)) if len(mine) else float("nan")})
    return records, latencies


def batch1_result(*, model, hardware, system, cache_config, trace, options, cost, sched, begin, end, hits, misses,
                  stall, experts, totals, memory, peak_bytes, extra, wall0):
    """The RunResult of a batch-1 fast run from its per-iteration arrays (``sched``'s iterations):
    the iteration records, the requests' latencies, the KV the run held, the summary."""
    from expertsim.sim.metrics import summarise

    n = len(sched.start)
    decode_cum = np.concatenate([[0], np.cumsum(trace.phase == 1)])
    columns = {"iteration": np.arange(n, dtype=np.int64), "request": sched.request.astype(np.int64),
               "requests": np.ones(n, dtype=np.int64), "phase": sched.phase, "tokens": sched.stop - sched.start,
               "decode_tokens": decode_cum[sched.stop] - decode_cum[sched.start], "start_ns": begin, "end_ns": end,
               "hits": hits, "misses": misses, "stall_ns": stall, "experts": experts}
    requests, latencies = _request_records(sched, begin, end, options.arrival)
    max_kv = int(sched.context.max()) if n else 0
    memory["kv_bytes"] = max(memory["kv_bytes"], int(round(model.kv_bytes_per_token_stored * max_kv)))
    result = summarise(
        model=model, hardware=hardware, system=system, cache_config=cache_config, trace=trace, columns=columns,
        totals=totals, timeline=None, memory=memory, cost=cost, scope=options.scope, peak_cache_bytes=peak_bytes,
        engine="fast", requests=requests, decode_latencies_ns=latencies, serving=options.serving_summary(),
        extra=extra,
    )
    result.metrics["wall_s"] = time.perf_counter() - wall0
    return result


class _Background:
    """``fn(*args)`` on a thread of its own; :meth:`result` waits for it (and re-raises)."""

    def __init__(self, fn, *args):
        self._out: dict = {}
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn, args) -> None:
        try:
            self._out["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller by result()
            self._out["error"] = exc

    def result(self):
        self._thread.join()
        if "error" in self._out:
            raise self._out["error"]
        return self._out["value"]


def simulate_fast(model, hardware, system, cache_config, trace, options, *, cache_pass=None):
    """The fast engine's :class:`~expertsim.sim.metrics.RunResult`: the same metrics as
    ``Simulation(model, hardware, system, cache_config, options).run(trace)`` (engine "fast").
    ``cache_pass(setup, trace, groups)``, when given, computes (hit, release, peak_cache_bytes)
    in place of the LRU/FIFO kernels (the caller has checked the run: see
    :mod:`expertsim.sim.fast.general`)."""
    if cache_pass is None and not supports_simulation(system, cache_config, options, model=model,
                                                      hardware=hardware):
        raise ConfigError(
            f"the fast engine does not support policy {system.label!r} with these options (it runs "
            f"the base system with LRU or FIFO, no-cache and all-on-gpu at batch 1, closed or offline "
            f"arrivals, whole-expert copies on one copy engine, no timeline); use --engine des"
        )
    start = batch1_start(model, hardware, system, cache_config, trace, options, top_k=model.top_k)
    sim, memory, sched, groups, wall0 = start.setup, start.memory, start.sched, start.groups, start.wall0
    m, opts, cost = model, options, sim.cost
    num_iters = len(sched.start)
    # The cache: which lookups hit, and which copies wait for a released item's compute.
    kind = _builtin_kind(system)
    num_layers, num_experts, expert_bytes = m.num_moe_layers, m.num_experts, m.expert_bytes()
    capacity, per_layer = _capacity_slots(sim.cache_config, num_layers, num_experts, expert_bytes)
    reset = np.zeros(groups.num_groups, dtype=bool)
    if opts.scope == "request" and num_iters:
        first = np.ones(num_iters, dtype=bool)
        first[1:] = sched.request[1:] != sched.request[:-1]
        reset = first[groups.pass_index] & (groups.layer == 0)
    initial = np.asarray(system.initial_residents(m), dtype=np.int64)
    if kind == "all-on-gpu":
        reset[:] = False  # a reset reloads every expert (ExpertCache.preload): nothing changes
    # The bound's Belady replay needs only the groups: with numba (which releases the GIL) it
    # runs on a second thread while the cache and timing kernels run here.
    belady = _Background(_belady_misses, m, groups, sim.cache_config, initial) if opts.bounds and HAVE_NUMBA else None
    if cache_pass is not None:
        hit, release, peak_bytes = cache_pass(sim, trace, groups)
    elif kind == "all-on-gpu":  # every expert resident from the start: every lookup hits, nothing leaves
        hit, release = None, None
        peak_bytes = len(initial) * expert_bytes
    else:
        hit, release, peak = run_lru(groups, capacity=capacity, per_layer=per_layer, reset=reset,
                                     clear_after=kind == "no-cache", num_keys=num_layers * num_experts,
                                     initial=initial, refresh=kind != "fifo")
        peak_bytes = int(peak) * expert_bytes
    # Timing: cost tables from the same CostModel, then the kernel.
    expert_ns = expert_times(cost, groups.tokens)
    copy_ns = cost.copy_overhead_ns(expert_bytes) + cost.copy_wire_ns(expert_bytes)
    if hit is None:  # every lookup hits
        layer_ns, stall_it, compute_it, hits_it, all_it = _resident_timing(groups.start, groups.tokens, expert_ns,
                                                                           num_layers)
    elif sim.runtime.serialises_copies:  # copies on the compute stream (runtime copy_stream = "compute")
        layer_ns, stall_it, compute_it, hits_it, all_it = _serial_timing(
            groups.start, hit, groups.tokens, expert_ns, copy_ns, cost.host_expert_ns, num_layers)
    else:
        layer_ns, stall_it, compute_it, hits_it, all_it = _timing_kernel(groups.start, hit, release, groups.tokens,
                                                                         expert_ns, copy_ns, num_layers)
    dense = dense_times(cost, sched)
    iter_ns = dense * m.num_layers + layer_ns
    end = np.cumsum(iter_ns)
    begin = end - iter_ns
    copies = int(all_it.sum() - hits_it.sum())
    totals = RunTotals(h2d_bytes=copies * expert_bytes, stall_ns=int(stall_it.sum()), copies=copies,
                       expert_compute_ns=int(compute_it.sum()), dense_compute_ns=int(dense.sum()) * m.num_layers)
    extra = {}
    if opts.bounds:
        misses = belady.result() if belady is not None else _belady_misses(m, groups, sim.cache_config, initial)
        extra = _bounds_metrics(cost, m, misses, dense_total_ns=totals.dense_compute_ns,
                                expert_total_ns=totals.expert_compute_ns, copy_chunk_bytes=opts.copy_chunk_bytes)
    return batch1_result(model=m, hardware=hardware, system=system, cache_config=sim.cache_config, trace=trace,
                         options=opts, cost=cost, sched=sched, begin=begin, end=end, hits=hits_it,
                         misses=all_it - hits_it, stall=stall_it, experts=all_it, totals=totals, memory=memory,
                         peak_bytes=peak_bytes, extra=extra, wall0=wall0)
