"""The SimPy discrete-event engine: the reference model of one GPU serving an MoE with offloading.

Resources: the GPU compute stream (the main process, here: dense layers and expert FFNs run one
after another); the host-to-device link (copy engines and a wire), the storage tier and the host
CPU, whose processes are in :mod:`expertsim.sim.des_link`.

A layer's expert computes wait for their copies, so copies of later experts overlap the compute
of earlier ones; the time the compute stream waits is the stall.

The engine asks the :class:`~expertsim.sim.batching.ContinuousBatcher` for each iteration (batch
1 by default: the trace's passes in order) and walks it model layer by layer. At each MoE layer
the shared :class:`LayerServer` applies the system's decisions to the shared
:class:`ExpertCache` logically; this module only attaches times, all of them from
:class:`~expertsim.sim.cost.CostModel`. Time is integer nanoseconds; SimPy orders simultaneous
events by insertion, so runs are deterministic.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import time
from dataclasses import dataclass

import numpy as np
import simpy

from expertsim.errors import ConfigError
from expertsim.policies import ExpertCache, RunContext, System
from expertsim.policies.records import RunTotals
from expertsim.policies.serve import CPU, SKIP, STREAM, LayerServer
from expertsim.sim import bounds
from expertsim.sim.compute_stream import ComputeStreamBook
from expertsim.sim.des_link import LinkProcesses, LinkResource, SortedPriorityResource, _Task, fire
from expertsim.sim.memory import storage_resident_keys
from expertsim.sim.metrics import RunResult, Timeline, columns_from_records, summarise
from expertsim.sim.batching import ContinuousBatcher, arrival_times_ns, plan_iterations
from expertsim.sim.setup import RunSetup, SimOptions  # noqa: F401  (SimOptions: re-exported)
from expertsim.sim.workload import Iteration, build_access_plan
from expertsim.traces import RoutingTrace


@dataclass
class Simulation(RunSetup):
    """One configuration: model, hardware, system, cache size. ``run(trace)`` gives a RunResult.
    The cost model, the cache size and the memory check come from :class:`RunSetup`, which the
    fast engine builds too."""

    # --- run ------------------------------------------------------------------------------
    def _fast_with_des_window(self, trace: RoutingTrace, progress=None) -> RunResult | None:
        """``--engine auto`` with a timeline window (compare's report): the metrics from the fast
        engine over the whole trace, the timeline from the DES stopped at the window's end (a
        run's first iterations do not depend on later ones: the window's rows are the full DES
        run's). None when the fast engine does not apply."""
        fast_opts = dataclasses.replace(self.options, timeline=False, timeline_iterations=None)
        if _fast_path_of(dataclasses.replace(self, options=fast_opts), fast_opts) is None:
            return None
        des = dataclasses.replace(self, system=copy.deepcopy(self.system),
                                  options=dataclasses.replace(self.options, engine="des", bounds=False))
        result = dataclasses.replace(self, options=fast_opts).run(trace, progress)
        a, b = self.options.timeline_iterations
        window = des.run(trace, stop_after=b)
        result.timeline = window.timeline
        result.assumptions.append(f"timeline: iterations {a}..{b - 1} from the DES (the fast engine has no "
                                  f"timeline; the DES's numbers are the same)")
        return result

    def run(self, trace: RoutingTrace, progress=None, *, stop_after: int | None = None) -> RunResult:
        """Simulate ``trace``. ``progress``: called with a one-line status (tokens done,
        simulated and wall time) every few seconds of a DES run. ``stop_after``: the DES stops
        after that many iterations (its timeline window is then complete; the metrics are of
        the part run)."""
        wall0 = time.perf_counter()
        m, opts = self.model, self.options
        trace.check_model(m)
        longest = _longest_request_context(trace)
        if self.cache_config is None:
            self.cache_config = self.system.default_cache_config(m, self.hardware, longest * opts.batch)
        runner_class, engine = _DesRun, "des"
        if opts.engine == "auto" and opts.timeline and opts.timeline_iterations is not None and stop_after is None:
            split = self._fast_with_des_window(trace, progress)
            if split is not None:
                return split
        if opts.engine != "des":
            fast = _fast_path_of(self, opts)
            if fast == "stepped":
                from expertsim.sim.fast import stepped

                runner_class, engine = stepped.SteppedRun, "fast"
            elif fast is not None:
                return fast(m, self.hardware, self.system, self.cache_config, trace, opts)
            elif opts.engine == "fast":
                raise ConfigError(
                    f"the fast engine does not reproduce {self.system.label!r} with these options "
                    f"(it needs one copy engine, whole-expert copies, every expert in host memory and no "
                    f"timeline); use --engine des or auto"
                )
        memory = self.memory_check(longest)
        # A hybrid system never copies a miss into its cache (CPU or streamed): no top-k floor.
        copies_misses = not getattr(self.system, "cpu_per_layer", False)
        cache = ExpertCache(m.num_moe_layers, m.num_experts, m.expert_bytes(), self.cache_config,
                            self.system.eviction, top_k=m.top_k if copies_misses else 0)
        num_requests = len(trace.request_starts()) - 1
        arrivals = arrival_times_ns(num_requests, opts.arrival, rate_per_s=opts.rate_per_s, seed=opts.seed,
                                    timestamps_ns=opts.arrival_times_ns)
        custom_select = type(self.system).select_batch is not System.select_batch
        oracle = getattr(self.system, "oracle", False) or getattr(self.system.eviction, "oracle", False)
        planned = None
        if not custom_select or oracle:
            # The access plan for oracles: the iterations, when they do not depend on timing.
            planned = plan_iterations(trace, max_batch=opts.batch, prefill_chunk_tokens=opts.prefill_chunk_tokens,
                                      select_batch=self.system.select_batch if custom_select else None,
                                      arrivals_ns=arrivals)
        if oracle and planned is None:
            raise ConfigError(
                f"{self.system.label} uses future knowledge (oracle), which needs iterations that do not "
                f"depend on timing: use the closed loop or --offline, not --rate or timestamps"
            )
        plan = build_access_plan(trace, planned, m.num_experts) if planned is not None else None
        self.system.prepare(RunContext(model=m, hardware=self.hardware, cost=self.cost, cache=cache,
                                       trace=trace, plan=plan))
        initial = np.asarray(self.system.initial_residents(m), dtype=np.int64)
        cache.preload(initial)
        server = LayerServer(self.system, cache, m.expert_bytes(),
                             m.expert_bytes(self.system.low_precision_dtype))
        batcher = ContinuousBatcher(trace, max_batch=opts.batch, arrivals_ns=arrivals,
                                    prefill_chunk_tokens=opts.prefill_chunk_tokens,
                                    select_batch=self.system.select_batch)
        runner = runner_class(self, trace, batcher, cache, server, progress=progress)
        if stop_after is not None:
            runner.stop_after = int(stop_after)
        runner.execute()
        runner.totals.prefetch_admitted = cache.prefetch_admitted
        runner.totals.prefetch_hits = cache.prefetch_hits
        memory["kv_bytes"] = max(memory["kv_bytes"], int(round(m.kv_bytes_per_token_stored * runner.max_kv_tokens)))
        extra = {}
        if opts.bounds:
            extra = bounds.run_bounds(self.cost, m, trace, runner.iterations, self.cache_config,
                                      initial_residents=initial, copy_chunk_bytes=opts.copy_chunk_bytes)
        result = summarise(
            model=m, hardware=self.hardware, system=self.system, cache_config=self.cache_config,
            trace=trace, columns=columns_from_records(runner.records), totals=runner.totals,
            timeline=runner.timeline, memory=memory, cost=self.cost, scope=opts.scope,
            peak_cache_bytes=cache.peak_used_bytes, engine=engine,
            requests=batcher.request_records(), decode_latencies_ns=batcher.decode_latencies_ns(),
            serving=opts.serving_summary(),
            extra=extra,
        )
        result.metrics["wall_s"] = time.perf_counter() - wall0
        return result


def _fast_path_of(sim: "Simulation", opts):
    """Which fast path reproduces ``sim`` under ``opts``: a run function, "stepped", or None."""
    from expertsim.sim.fast import general as fast_general
    from expertsim.sim.fast import hybrid, plans, stepped, support

    m, hw, system, cfg = sim.model, sim.hardware, sim.system, sim.cache_config
    if support.supports_simulation(system, cfg, opts, model=m, hardware=hw):  # the LRU/FIFO cache kernels
        return fast_general.simulate
    if hybrid.supports_simulation(system, cfg, opts, model=m, hardware=hw):
        return hybrid.simulate
    if plans.supports_simulation(system, cfg, opts, model=m, hardware=hw):  # a plain System's static hot set,
        return plans.simulate  # activation priority or sequence activation too
    if fast_general.supports_simulation(system, cfg, opts, model=m, hardware=hw):  # any other eviction policy
        return fast_general.simulate
    if stepped.supports_run(opts, hw, m) and (opts.engine == "fast" or _builtin(system)):
        return "stepped"
    return None


def _builtin(system) -> bool:
    """A system built from expertsim's own classes (``--engine auto`` runs those on the fast
    engine; a plug-in stays on the DES, the readable reference, unless ``--engine fast``)."""
    parts = [system] + [p for p in getattr(system, "parts", lambda: {})().values() if p is not None
                        and not isinstance(p, str)]
    return all(type(p).__module__.startswith("expertsim.") for p in parts) and \
        type(system.eviction).__module__.startswith("expertsim.")


def _longest_request_context(trace: RoutingTrace) -> int:
    return int(trace.position.max()) + 1 if trace.num_tokens else 1


@functools.lru_cache(maxsize=1)
def simpy_internals_ok() -> bool:
    """Whether this SimPy has the internals the DES's shortcuts read and write (SimPy 4: the
    environment's ``_queue`` heap and ``_now``, a triggered event's ``_ok`` and ``_value``), tried
    on an environment of its own; without them a run takes the plain DES, SimPy's public
    interface only (the same results, slower)."""
    env = simpy.Environment()
    event = env.event().succeed()
    return (isinstance(getattr(env, "_queue", None), list) and getattr(env, "_now", None) == env.now
            and getattr(event, "_ok", None) is True and hasattr(event, "_value"))


class _DesRun(ComputeStreamBook, LinkProcesses):
    """The SimPy processes of one run."""

    # False: the plain DES, one SimPy timeout per compute (see _compute), SimPy's processes with
    # their end events (LinkProcesses._spawn), SimPy's resources for the link, and every event
    # scheduled even when nobody waits for it (des_link.fire, LinkResource); the same results,
    # more events and more work per event (the tests compare the two).
    SKIP_COMPUTES = True

    def __init__(self, sim: Simulation, trace: RoutingTrace, batcher: ContinuousBatcher,
                 cache: ExpertCache, server: LayerServer, progress=None):
        self.sim, self.trace, self.batcher = sim, trace, batcher
        self.progress = progress
        self._tokens_done = 0
        self._wall0 = self._last_report = time.perf_counter()
        self.cache, self.server, self.cost = cache, server, sim.cost
        self.env = simpy.Environment()
        if self.SKIP_COMPUTES and not simpy_internals_ok():
            self.SKIP_COMPUTES = False  # a SimPy without the internals the shortcuts use: the plain DES
        link = sim.hardware.link
        # SimPy's own resource in the plain DES (the tests compare the two)
        resource = LinkResource if self.SKIP_COMPUTES else SortedPriorityResource
        self.engines = resource(self.env, capacity=link.copy_engines)
        # The link's bytes are serial: one wire shared by the engines (with a single engine, the
        # engine already serialises them and no wire resource is needed).
        self.wire = resource(self.env, capacity=1) if link.copy_engines > 1 else None
        self.fifo_link = sim.options.link_queue == "fifo"  # issue order, no prefetch dropped
        self.storage = simpy.Resource(self.env, capacity=1)
        self.cpu = simpy.Resource(self.env, capacity=1)
        m = sim.model
        self.on_storage = storage_resident_keys(m, sim.hardware)
        self.any_on_storage = bool(self.on_storage.any())
        self.per_layer_partitions = cache.num_partitions > 1  # cache.partition(layer) == layer
        self._copy_ns: dict[int, tuple[int, int]] = {}  # chunk bytes -> (engine overhead, wire) ns
        self.chunk_bytes = sim.options.copy_chunk_bytes
        self.memory = sim.gpu_memory()
        self.copies: dict[int, _Copy] = {}  # key -> its latest copy
        self.slot_copy: dict[tuple[int, int], _Copy] = {}  # (partition, slot) -> latest copy into it
        self.records: list[dict] = []
        self.iterations: list[Iteration] = []
        self.max_kv_tokens = 0
        self.totals = RunTotals()
        self.timeline = Timeline() if sim.options.timeline else None
        self._moe_index = {layer: i for i, layer in enumerate(m.moe_layers)}
        # Runtime with copies on the compute stream: every kernel waits for the copies issued
        # before it (stream order); host time (framework) overlaps them.
        self.serial = sim.runtime.serialises_copies
        self._evictions_seen = 0
        self.stream_copies: list[_Copy] = []
        self._record_iteration = True
        self.now = 0  # the compute stream's clock: ahead of env.now while nothing else can run (_compute)
        # SimPy's event queue, a heap of (time, priority, id, event): ``queue and queue[0][0] <= end``
        # is ``env.peek() <= end`` without the call (per compute). The plain DES reads a queue whose
        # first event is always due: it never skips a compute.
        self._queue = self.env._queue if self.SKIP_COMPUTES else [(-1,)]
        self._spawned: list = []  # processes started, to run when the main process waits (_spawn)
        self.num_experts = m.num_experts
        self.writeback = sim.runtime.writeback
        self.wb_bytes = m.expert_bytes()  # a full-precision expert (a write-back, a streamed expert)
        self.cpu_per_layer = getattr(sim.system, "cpu_per_layer", False)
        self.lowp = sim.system.low_precision_dtype
        self.wants_outcome = server.wants_outcome
        self._expert_ns: dict[int, int] = {}  # tokens -> full-precision expert time (cost.expert_time_ns)
        self._decodes_before = None  # decode rows before each trace row (_decode_tokens)
        self.stop_after: int | None = None  # end after this many iterations (a timeline window)

    def execute(self) -> None:
        if self.SKIP_COMPUTES:  # the main process starts the others when it waits (LinkProcesses._spawn)
            _Task(self.env, self._main(), on_suspend=self._start_spawned)
        else:
            self.env.process(self._main())
        self.env.run()

    def _drain_stream(self, it, layer):
        """Wait for every copy issued on the compute stream so far (a kernel queued after them
        cannot start before they end). Returns the wait in ns (stall)."""
        waited = 0
        for copy in self.stream_copies:
            if not copy.landed:
                yield from self._sync()
                t0 = self.env.now
                yield copy.done
                self.now = self.env.now
                waited += self.env.now - t0
                self._row("gpu", "stall", it, layer, -1, t0, self.env.now)
        self.stream_copies = []
        return waited

    # --- memory ---------------------------------------------------------------------------
    # --- main process: the GPU compute stream ---------------------------------------------
    def _main(self):
        env, m, batcher, queue = self.env, self.sim.model, self.batcher, self._queue
        opts = self.sim.options
        system = self.sim.system
        while not batcher.done:
            it, started = batcher.next_iteration(self.now)
            if it is None:  # nothing ready: idle until the next arrival
                t_next = batcher.next_arrival_ns()
                self.totals.idle_ns += t_next - self.now
                yield env.timeout(t_next - env.now)
                self.now = t_next
                continue
            for request in started:
                if opts.scope == "request":
                    yield from self._sync()
                    self._cancel_evicted(list(self.copies))
                    self.cache.reset()
                system.on_request_start(request)
            self.iterations.append(it)
            self._check_kv(it)
            window = opts.timeline_iterations
            self._record_iteration = window is None or window[0] <= it.index < window[1]
            start_iter = self.now
            timeline = self.timeline is not None
            stats = {"hits": 0, "misses": 0, "stall_ns": 0, "experts": 0}
            tokens, rows = it.tokens, it.rows
            t_dense = self.cost.dense_layer_time_ns(it.num_tokens, it.context_tokens, it.attention_pairs)
            for layer in range(m.num_layers):
                t0 = self.now
                if self.serial:  # host time overlaps the copies in flight; the kernels wait for them
                    host = min(self.cost.host_layer_ns, t_dense)
                    yield from self._compute(host)
                    self._row("gpu", "dense", it, layer, -1, t0, self.now)  # its host part
                    waited = yield from self._drain_stream(it, layer)
                    stats["stall_ns"] += waited
                    self.totals.stall_ns += waited
                    t0 = self.now
                    yield from self._compute(t_dense - host)
                else:  # self._compute(t_dense), inline
                    end = t0 + t_dense
                    if self._spawned or (queue and queue[0][0] <= end):  # env.peek() <= end
                        yield env.timeout(end - env.now)
                    self.now = end
                if timeline:
                    self._row("gpu", "dense", it, layer, -1, t0, self.now)
                moe = self._moe_index.get(layer)
                if moe is not None:
                    yield from self._moe_layer(it, moe, tokens, rows, stats)
            self.totals.dense_compute_ns += t_dense * m.num_layers
            self.records.append({
                "iteration": it.index, "request": it.request, "requests": it.num_requests,
                "phase": it.phase, "tokens": it.num_tokens,
                "decode_tokens": self._decode_tokens(it),
                "start_ns": start_iter, "end_ns": self.now,
                **stats,
            })
            batcher.complete(it, start_iter, self.now)
            if self.progress is not None:
                self._report(it.num_tokens)
            if self.stop_after is not None and it.index + 1 >= self.stop_after:
                self._record_iteration = False  # as the next iteration, outside the window, would
                break
        yield from self._sync()

    def _decode_tokens(self, it: Iteration) -> int:
        """How many of the iteration's tokens decode: from a running count for a run of
        consecutive rows (batch 1), else counted."""
        if it.token_index is None:
            before = self._decodes_before
            if before is None:
                before = self._decodes_before = np.concatenate(([0], np.cumsum(self.trace.phase == 1)))
            return int(before[it.stop] - before[it.start])
        return int((self.trace.phase[it.rows] == 1).sum())

    # --- the compute stream's clock -------------------------------------------------------
    # The main process keeps its own clock, ``self.now``, which may run ahead of SimPy's while
    # nothing else can happen in between: a compute of ``d`` ns whose end comes strictly before
    # every other scheduled event is not yielded to SimPy but added to ``self.now``
    # (:meth:`_compute`); the process catches SimPy up (:meth:`_sync`, one timeout for all the
    # computes it skipped) before anything that another process can see: starting a copy or a
    # CPU job, firing or waiting for an event. Nothing else runs before the skipped ends, so every
    # other event is processed in the same order and at the same time as with one timeout per
    # compute, and the results are the same; the DES just processes fewer SimPy events.
    def _compute(self, d: int):
        """Advance the compute stream by ``d`` ns (see above)."""
        end = self.now + d
        queue = self._queue
        if self._spawned or (queue and queue[0][0] <= end):  # env.peek() <= end
            yield self.env.timeout(end - self.env.now)
        self.now = end

    def _sync(self):
        """Bring SimPy's clock up to the compute stream's (see :meth:`_compute`)."""
        if self.now > self.env.now and not self._jump():
            yield self.env.timeout(self.now - self.env.now)

    def _jump(self) -> bool:
        """:meth:`_sync` without a timeout when nothing is due by the compute stream's clock (no
        event queued at or before it, no process started and not yet run): the timeout would be
        the very next event SimPy processes, with nothing run in between, so SimPy's clock is
        moved there at once (its ``_now``, as its ``step`` would set it) and everything else keeps
        its order, one event fewer. False otherwise (always in the plain DES: see ``_queue``)."""
        queue = self._queue
        if self._spawned or (queue and queue[0][0] <= self.now):
            return False
        self.env._now = self.now
        return True

    def _moe_layer(self, it: Iteration, layer: int, tokens: np.ndarray, rows, stats: dict):
        env, trace, copies = self.env, self.trace, self.copies
        weights = None if trace.weights is None else trace.weights[rows, layer]
        obs = self.server.observe(now_ns=self.now, iteration=it.index, layer=layer, tokens=tokens,
                                  experts=trace.experts[rows, layer], weights=weights,
                                  phase=it.phase, trace=trace)
        plan, _ = self.server.serve(obs)
        items, prefetches, evicted = plan.items, plan.prefetches, plan.evicted
        layer_start = self.now
        base = layer * self.num_experts  # cache.key(layer, e) == base + e
        serial = self.serial  # copies queued on the compute stream, in serve order
        # One pass over the items: the hits whose queued or in-flight prefetch is needed now
        # (promoted to a demand copy), the items that copy.
        promote, copy_items = {}, []
        for idx, item in enumerate(items):
            if item.hit:
                if item.loading_at_lookup:
                    copy = copies.get(base + item.expert)
                    if copy is not None and not copy.landed and copy.priority > 0:
                        promote[idx] = copy
            elif item.copy_bytes:
                copy_items.append(idx)
        # The copies of the hits, when this layer evicts: a hit released mid-layer to make room can
        # be evicted by this very layer; its copy, a prefetch still in flight, must land before its
        # compute all the same: keep it. (With no eviction, a hit's entry stays and so does its
        # latest copy: it is looked up at its compute.)
        hit_copies, cancel = None, []
        if evicted:
            hit_copies = {item.expert: copies.get(base + item.expert) for item in items if item.hit}
            own = {base + e for e in hit_copies}
            cancel = [key for key in evicted if key not in own]
        writebacks = 0
        if self.writeback:
            # Every expert that left the GPU since the last layer (evicted here, or dropped at the
            # end of a layer as no-cache does) is copied back, except copies still in flight.
            writebacks = self.cache.evictions - self._evictions_seen - sum(map(self._in_flight, evicted))
        self._evictions_seen = self.cache.evictions
        # The i-th copy issued at this layer (demand copies in serve order, then prefetches)
        # carries a write-back while there are some left.
        wb = [self.wb_bytes if i < writebacks else 0 for i in range(len(copy_items) + len(prefetches))] \
            if writebacks > 0 else None
        cpu_per_layer = self.cpu_per_layer
        if (promote or plan.streamed_experts or (cpu_per_layer and plan.cpu_experts)
                or (not serial and (prefetches or copy_items)) or any(map(self._in_flight, cancel))):
            # a copy or a CPU job starts, or a copy in flight is dropped or promoted: other
            # processes see it, so it happens at SimPy's time
            if self.now > env.now and not self._jump():  # self._sync(), inline (per miss)
                yield env.timeout(self.now - env.now)
        if evicted:
            self._cancel_evicted(cancel)
            for key in evicted:
                if key in own:
                    copies.pop(key, None)
        # Compute-done events only for the items a copy waits for (room they release).
        compute_done = {items[idx].wait_compute: env.event() for idx in copy_items
                        if items[idx].wait_compute >= 0} if copy_items else None
        # Demand copies, in serve order, then prefetches (with copies on the compute stream: each
        # demand copy just before its kernel, the prefetches after the layer's kernels).
        if promote or (copy_items and not serial):
            i = 0
            for idx, item in enumerate(items):
                copy = promote.get(idx)
                if copy is not None:  # needed now: a queued or in-flight prefetch becomes a demand copy
                    copy.priority = 0
                    if not copy.woken():
                        fire(copy.wake_event(env), self.SKIP_COMPUTES)
                if item.copy_bytes and not serial:
                    after = compute_done[item.wait_compute] if item.wait_compute >= 0 else None
                    self._start_copy(it, layer, item.expert, item.slot, item.copy_bytes, 0, after,
                                     wb[i] if wb else 0)
                    i += 1
        if prefetches and not serial:
            self._start_prefetches(it, prefetches, wb[len(copy_items):] if wb else None)
        deferred = {idx: wb[i] if wb else 0 for i, idx in enumerate(copy_items)} if serial else None
        cpu_done = []
        stall = 0
        # Hybrid systems (policies/hybrid.py): a layer's CPU experts run as one host job, and its
        # streamed experts arrive in one copy (the layer's tensor) before any of them computes.
        if cpu_per_layer and plan.cpu_experts:
            cpu_done.append(env.event())
            cpu_tokens = [item.tokens for item in items if item.action is CPU]
            self._spawn(self._cpu_layer(it, layer, cpu_tokens, it.num_tokens, cpu_done[-1]))
        stream_done = None
        if plan.streamed_experts:
            stream_done = env.event()
            self._spawn(self._stream(it, layer, plan.streamed_experts * self.wb_bytes, stream_done))
        expert_time, expert_ns = self.cost.expert_time_ns, self._expert_ns
        host_ns = self.cost.host_expert_ns if serial else 0
        timeline = self.timeline is not None
        queue = self._queue
        computed = 0
        for idx, item in enumerate(items):
            done = compute_done.get(idx) if compute_done else None
            action = item.action
            if deferred and idx in deferred:  # on the compute stream: issued now, after the kernels before it
                yield from self._sync()
                after = compute_done[item.wait_compute] if item.wait_compute >= 0 else None
                self._start_copy(it, layer, item.expert, item.slot, item.copy_bytes, 0, after, deferred[idx])
            if action is SKIP or action is CPU:
                if done is not None or (action is CPU and not cpu_per_layer):
                    yield from self._sync()
                if action is CPU and not cpu_per_layer:
                    cpu_done.append(env.event())
                    self._spawn(self._cpu_expert(it, layer, item.expert, item.tokens, cpu_done[-1]))
                if done is not None:
                    fire(done, self.SKIP_COMPUTES)
                continue
            if item.low_precision:
                t = expert_time(item.tokens, low_precision_dtype=self.lowp)
            else:
                t = expert_ns.get(item.tokens)
                if t is None:
                    t = expert_ns[item.tokens] = expert_time(item.tokens)
            host = min(host_ns, t) if host_ns else 0
            if host:  # the expert call's host work overlaps the copies in flight on the stream
                t0 = self.now
                yield from self._compute(host)
                self._row("gpu", "expert", it, layer, item.expert, t0, self.now)  # its host part
                stall += yield from self._drain_stream(it, layer)
            if action is STREAM and not stream_done.triggered:
                stall += yield from self._wait(stream_done, it, layer, item.expert)
            copy = hit_copies[item.expert] if item.hit and hit_copies is not None \
                else copies.get(base + item.expert)
            if copy is not None and not copy.landed:  # self._wait(copy.done, ...), inline
                if self.now > env.now and not self._jump():
                    yield env.timeout(self.now - env.now)
                t0 = env.now
                yield copy.done
                self.now = env.now
                stall += self.now - t0
                if timeline:
                    self._row("gpu", "stall", it, layer, item.expert, t0, self.now)
            if serial:
                stall += yield from self._drain_stream(it, layer)
            t0 = self.now
            end = t0 + t - host
            if self._spawned or (queue and queue[0][0] <= end):  # self._compute(t - host), inline
                yield env.timeout(end - env.now)
            self.now = end
            computed += t
            if timeline:
                self._row("gpu", "expert", it, layer, item.expert, t0, end)
            if done is not None:
                yield from self._sync()
                fire(done, self.SKIP_COMPUTES)
        self.totals.expert_compute_ns += computed
        if serial and prefetches:  # on the compute stream, after this layer's kernels: they overlap the next host work
            yield from self._sync()
            self._start_prefetches(it, prefetches, wb[len(copy_items):] if wb else None)
        for done in cpu_done:
            if not done.triggered:
                stall += yield from self._wait(done, it, layer, -1)
        self._end_layer(obs, plan, stats, stall, layer_start)

    def _start_prefetches(self, it: Iteration, prefetches: list, writebacks: list[int] | None) -> None:
        for i, pf in enumerate(prefetches):
            self._start_copy(it, pf.layer, pf.expert, pf.slot, pf.copy_bytes, pf.priority, None,
                             writebacks[i] if writebacks else 0)

    def _wait(self, event: simpy.Event, it: Iteration, layer: int, expert: int):
        """The compute stream waits for ``event`` (a copy, a CPU job): returns the stall in ns."""
        yield from self._sync()
        t0 = self.env.now
        yield event
        self.now = self.env.now
        self._row("gpu", "stall", it, layer, expert, t0, self.now)
        return self.now - t0
