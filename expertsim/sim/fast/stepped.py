"""The fast engine for every system: the DES's compute stream, step for step, without SimPy.

:class:`SteppedRun` is the DES's ``_DesRun`` (:mod:`expertsim.sim.engine`) with SimPy replaced by
:class:`~expertsim.sim.fast.events.LinkQueue`: the compute stream is plain code with one clock,
and the copies and CPU jobs are an event queue it advances to its clock before it does anything
they can see (issue, drop or promote a copy, start a CPU job, end a compute a copy waits for,
wait). The system decides as in the DES, through the same :class:`LayerServer` and
:class:`ExpertCache`, with the same observations (``now_ns`` included) and the same layer outcomes,
so systems whose decisions read time (ExpertFlow's adaptive prefetch distance, the cache-aware
serve order) are reproduced too; entries become resident when their copy lands, as in the DES.

Where it applies (:func:`supports_run`): one copy engine, whole-expert copies, no storage tier,
no timeline; any batch, arrivals, runtime (host times, copies on the compute stream, write-back),
prefetch, miss handling (CPU, skip, low precision, streamed), scope. The numbers are the DES's;
the time it saves is SimPy's (its events, its processes), not the system's own Python.
"""
from __future__ import annotations

import time

from expertsim.policies import MissAction
from expertsim.policies.records import RunTotals
from expertsim.sim.compute_stream import ComputeStreamBook
from expertsim.sim.fast.events import Copy, CpuJob, LinkQueue, Signal


def supports_run(options, hardware, model) -> bool:
    """Whether :class:`SteppedRun` reproduces the DES for these run conditions: one copy engine,
    whole-expert copies, every expert in host memory (no storage tier), no timeline."""
    from expertsim.errors import ConfigError
    from expertsim.sim.memory import storage_resident_keys

    if options.timeline or options.copy_chunk_bytes is not None or hardware.link.copy_engines != 1:
        return False
    try:
        return not storage_resident_keys(model, hardware).any()
    except ConfigError:
        return False


class SteppedRun(ComputeStreamBook):
    """One run of the DES's compute stream over a :class:`LinkQueue` (see the module docstring).
    The same constructor, ``execute()`` and results (``records``, ``iterations``, ``totals``,
    ``max_kv_tokens``, ``timeline`` None) as the DES's ``_DesRun``."""

    ENGINE_NAME = "fast"

    def __init__(self, sim, trace, batcher, cache, server, progress=None):
        self.sim, self.trace, self.batcher = sim, trace, batcher
        self.cache, self.server, self.cost = cache, server, sim.cost
        self.progress = progress
        self._tokens_done = 0
        self._wall0 = self._last_report = time.perf_counter()
        m = sim.model
        self.totals = RunTotals()
        self.link = LinkQueue(self.totals, self._landed)
        self.fifo_link = sim.options.link_queue == "fifo"
        self.per_layer_partitions = cache.num_partitions > 1
        self.copies: dict[int, Copy] = {}  # key -> its latest copy
        self.slot_copy: dict[tuple[int, int], Copy] = {}
        self.stream_copies: list[Copy] = []
        self.records: list[dict] = []
        self.iterations = []
        self.max_kv_tokens = 0
        self.timeline = None
        self.memory = sim.gpu_memory()
        self._moe_index = {layer: i for i, layer in enumerate(m.moe_layers)}
        self.serial = sim.runtime.serialises_copies
        self._evictions_seen = 0
        self.now = 0
        self.num_experts = m.num_experts
        self.writeback = sim.runtime.writeback
        self.wb_bytes = m.expert_bytes()
        self.cpu_per_layer = getattr(sim.system, "cpu_per_layer", False)
        self.lowp = sim.system.low_precision_dtype
        self.wants_outcome = server.wants_outcome
        self._expert_ns: dict[int, int] = {}
        self._copy_ns: dict[int, int] = {}
        self._cpu_ns: dict[int, int] = {}  # tokens -> cost.cpu_expert_time_ns

    # --- the link ---------------------------------------------------------------------------
    def _landed(self, copy: Copy) -> None:
        if self.copies.get(copy.key) is copy:
            layer, expert = divmod(copy.key, self.num_experts)
            self.cache.mark_resident(layer, expert)

    def _copy_time(self, nbytes: int, writeback: int) -> int:
        t = self._copy_ns.get(nbytes)
        if t is None:
            t = self._copy_ns[nbytes] = self.cost.copy_overhead_ns(nbytes) + self.cost.copy_wire_ns(nbytes)
        return t + (self.cost.transfer_time_ns(writeback) if writeback else 0)

    def _start_copy(self, layer, expert, slot, nbytes, priority, after, writeback=0) -> Copy:
        """As the DES's ``_start_copy``, at ``self.now`` (the queue advanced to it)."""
        key = layer * self.num_experts + expert
        prefetch = priority > 0
        slot_id = (layer if self.per_layer_partitions else 0, slot)
        copy = Copy(key, nbytes, self._copy_time(nbytes, writeback), writeback,
                    0 if self.fifo_link else priority, prefetch, after, self.slot_copy.get(slot_id))
        self.copies[key] = copy
        if self.serial:
            self.stream_copies.append(copy)
        self.slot_copy[slot_id] = copy
        self.link.issue(copy, self.now)
        return copy

    def _in_flight(self, key: int) -> bool:
        copy = self.copies.get(key)
        return copy is not None and copy.done_ns < 0

    def _cancel_evicted(self, keys) -> list:
        """As the DES's: returns the queued prefetches dropped now (the caller hands them to
        :meth:`LinkQueue.promote` after its copies of this instant)."""
        dropped = []
        for key in keys:
            copy = self.copies.get(key)
            if copy is not None and copy.done_ns < 0 and not self.fifo_link:
                copy.cancelled = True
                if copy.queued is not None:
                    dropped.append(copy)
            if copy is not None:
                del self.copies[key]
        return dropped

    def _compute(self, d: int) -> None:
        """The compute stream computes for ``d`` ns; the copies it issued start (as SimPy runs
        the processes it started before a compute ends)."""
        if self.link.pending:
            self.link.start_pending()
        self.now += d

    def _wait(self, obj) -> int:
        """The compute stream waits for a copy or CPU job: the stall in ns."""
        end = self.link.wait(obj)
        if end > self.now:
            stall = end - self.now
            self.now = end
            return stall
        return 0

    def _drain_stream(self) -> int:
        waited = 0
        for copy in self.stream_copies:
            waited += self._wait(copy)
        self.stream_copies = []
        return waited

    # --- the compute stream -------------------------------------------------------------------
    def execute(self) -> None:
        m, batcher, opts, system = self.sim.model, self.batcher, self.sim.options, self.sim.system
        link, cost, totals = self.link, self.cost, self.totals
        while not batcher.done:
            it, started = batcher.next_iteration(self.now)
            if it is None:
                t_next = batcher.next_arrival_ns()
                totals.idle_ns += t_next - self.now
                self._compute(t_next - self.now)  # idle: as a compute, the copies issued start
                continue
            for request in started:
                if opts.scope == "request":
                    # As the DES: everything before now has happened; the copies issued at this
                    # instant have not started (nothing computed since), so they are dropped.
                    link.advance(self.now - 1, start_pending=False)
                    link.promote([], self._cancel_evicted(list(self.copies)), self.now)
                    self.cache.reset()
                system.on_request_start(request)
            self.iterations.append(it)
            self._check_kv(it)
            start_iter = self.now
            stats = {"hits": 0, "misses": 0, "stall_ns": 0, "experts": 0}
            tokens = it.tokens
            t_dense = cost.dense_layer_time_ns(it.num_tokens, it.context_tokens, it.attention_pairs)
            for layer in range(m.num_layers):
                if self.serial:
                    host = min(cost.host_layer_ns, t_dense)
                    self._compute(host)
                    waited = self._drain_stream()
                    stats["stall_ns"] += waited
                    totals.stall_ns += waited
                    self._compute(t_dense - host)
                else:
                    self._compute(t_dense)
                moe = self._moe_index.get(layer)
                if moe is not None:
                    self._moe_layer(it, moe, tokens, stats)
            totals.dense_compute_ns += t_dense * m.num_layers
            self.records.append({
                "iteration": it.index, "request": it.request, "requests": it.num_requests,
                "phase": it.phase, "tokens": it.num_tokens,
                "decode_tokens": int((self.trace.phase[it.rows] == 1).sum()),
                "start_ns": start_iter, "end_ns": self.now, **stats,
            })
            batcher.complete(it, start_iter, self.now)
            if self.progress is not None:
                self._report(it.num_tokens)
        link.drain()

    def _moe_layer(self, it, layer: int, tokens, stats: dict) -> None:
        trace, copies, link = self.trace, self.copies, self.link
        link.advance(self.now)
        rows = it.rows
        weights = None if trace.weights is None else trace.weights[rows, layer]
        obs = self.server.observe(now_ns=self.now, iteration=it.index, layer=layer, tokens=tokens,
                                  experts=trace.experts[rows, layer], weights=weights,
                                  phase=it.phase, trace=trace)
        plan, _ = self.server.serve(obs)
        items, prefetches, evicted = plan.items, plan.prefetches, plan.evicted
        layer_start = self.now
        base = layer * self.num_experts
        serial = self.serial
        hit_copies, promote, copy_items = {}, {}, []
        for idx, item in enumerate(items):
            if item.hit:
                copy = hit_copies[item.expert] = copies.get(base + item.expert)
                if item.loading_at_lookup and copy is not None and copy.done_ns < 0 and copy.priority > 0:
                    promote[idx] = copy
            elif item.copy_bytes:
                copy_items.append(idx)
        cancel = []
        own = ()
        if evicted:
            own = {base + e for e in hit_copies}
            cancel = [key for key in evicted if key not in own]
        writebacks = 0
        if self.writeback:
            writebacks = self.cache.evictions - self._evictions_seen - sum(map(self._in_flight, evicted))
        self._evictions_seen = self.cache.evictions
        wb = [self.wb_bytes if i < writebacks else 0 for i in range(len(copy_items) + len(prefetches))] \
            if writebacks > 0 else None
        dropped = []
        if evicted:
            dropped = self._cancel_evicted(cancel)
            for key in evicted:
                if key in own:
                    copies.pop(key, None)
        compute_done = {items[idx].wait_compute: Signal() for idx in copy_items if items[idx].wait_compute >= 0}
        promoted = []
        if promote or (copy_items and not serial):
            i = 0
            for idx, item in enumerate(items):
                copy = promote.get(idx)
                if copy is not None:
                    copy.priority = 0
                    if copy.queued is not None and not copy.cancelled:
                        promoted.append(copy)
                if item.copy_bytes and not serial:
                    after = compute_done[item.wait_compute] if item.wait_compute >= 0 else None
                    self._start_copy(layer, item.expert, item.slot, item.copy_bytes, 0, after, wb[i] if wb else 0)
                    i += 1
        if prefetches and not serial:
            self._start_prefetches(prefetches, wb[len(copy_items):] if wb else None)
        deferred = {idx: wb[i] if wb else 0 for i, idx in enumerate(copy_items)} if serial else None
        cpu_done = []
        stall = 0
        cpu_per_layer = self.cpu_per_layer
        if cpu_per_layer and plan.cpu_experts:
            cpu_tokens = [item.tokens for item in items if item.action is MissAction.CPU]
            job = CpuJob(self.cost.cpu_layer_time_ns(cpu_tokens, it.num_tokens))
            link.cpu(job, self.now)
            cpu_done.append(job)
        stream = None
        if plan.streamed_experts:
            nbytes = plan.streamed_experts * self.wb_bytes
            stream = Copy(-1, nbytes, self.cost.transfer_time_ns(nbytes), 0, 0, False, None, None)
            link.issue(stream, self.now)
        if promoted or dropped:  # after every copy issued at this instant (SimPy: processes start first)
            link.promote(promoted, dropped, self.now)
        expert_time, expert_ns = self.cost.expert_time_ns, self._expert_ns
        host_ns = self.cost.host_expert_ns if serial else 0
        computed = 0
        for idx, item in enumerate(items):
            done = compute_done.get(idx) if compute_done else None
            action = item.action
            if deferred and idx in deferred:
                link.advance(self.now)
                after = compute_done[item.wait_compute] if item.wait_compute >= 0 else None
                self._start_copy(layer, item.expert, item.slot, item.copy_bytes, 0, after, deferred[idx])
            if action is MissAction.SKIP or action is MissAction.CPU:
                if action is MissAction.CPU and not cpu_per_layer:
                    link.advance(self.now)
                    t_cpu = self._cpu_ns.get(item.tokens)
                    if t_cpu is None:
                        t_cpu = self._cpu_ns[item.tokens] = self.cost.cpu_expert_time_ns(item.tokens)
                    job = CpuJob(t_cpu)
                    link.cpu(job, self.now)
                    cpu_done.append(job)
                if done is not None:
                    link.advance(self.now)
                    link.fire(done, self.now)
                continue
            if item.low_precision:
                t = expert_time(item.tokens, low_precision_dtype=self.lowp)
            else:
                t = expert_ns.get(item.tokens)
                if t is None:
                    t = expert_ns[item.tokens] = expert_time(item.tokens)
            host = min(host_ns, t)
            if host:
                self._compute(host)
                stall += self._drain_stream()
            if action is MissAction.STREAM:
                stall += self._wait(stream)
            copy = hit_copies.get(item.expert) if item.hit else copies.get(base + item.expert)
            if copy is not None:
                stall += self._wait(copy)
            if serial:
                stall += self._drain_stream()
            self._compute(t - host)
            computed += t
            if done is not None:
                link.advance(self.now)
                link.fire(done, self.now)
        self.totals.expert_compute_ns += computed
        if serial and prefetches:
            link.advance(self.now)
            self._start_prefetches(prefetches, wb[len(copy_items):] if wb else None)
        for job in cpu_done:
            stall += self._wait(job)
        self._end_layer(obs, plan, stats, stall, layer_start)

    def _start_prefetches(self, prefetches, writebacks) -> None:
        for i, pf in enumerate(prefetches):
            self._start_copy(pf.layer, pf.expert, pf.slot, pf.copy_bytes, pf.priority, None,
                             writebacks[i] if writebacks else 0)
