"""The SimPy discrete-event engine: the reference model of one GPU serving an MoE with offloading.

Resources: the GPU compute stream (the main process: dense layers and expert FFNs run one after
another), the host-to-device link (a priority resource with one server per copy engine: demand
copies, priority 0, go before prefetches; a started copy runs to completion), and the host CPU
(for experts computed there). A layer's expert computes wait for their copies, so copies of later
experts overlap the compute of earlier ones; the time the compute stream waits is the stall.

The engine walks the workload iteration by iteration (batch 1: one forward pass of one request)
and model layer by layer. At each MoE layer the shared :class:`LayerServer` applies the system's
decisions to the shared :class:`ExpertCache` logically; this module only attaches times. Time is
integer nanoseconds; SimPy orders simultaneous events by insertion, so runs are deterministic.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import simpy

from expertsim.errors import ConfigError
from expertsim.policies import CacheConfig, ExpertCache, LayerOutcome, MissAction, RunContext, System
from expertsim.policies.serve import LayerServer
from expertsim.sim.cost import CostModel
from expertsim.sim.metrics import RunResult, Timeline, summarise
from expertsim.sim.workload import Iteration, build_access_plan, iterations_batch1
from expertsim.specs import HardwareSpec, ModelSpec
from expertsim.traces import RoutingTrace


@dataclass
class _Copy:
    """One host-to-device copy in the DES."""

    key: int
    done: simpy.Event
    promote: simpy.Event
    started: bool = False
    cancelled: bool = False


@dataclass
class SimOptions:
    scope: str = "global"  # "global": cache persists across requests; "request": emptied per request
    timeline: bool = False  # record every copy/compute/stall
    timeline_iterations: tuple[int, int] | None = None  # record only iterations in [a, b)
    check_memory: bool = True  # fail when dense + KV + cache exceed GPU memory


@dataclass
class Simulation:
    """One configuration: model, hardware, system, cache size. ``run(trace)`` gives a RunResult."""

    model: ModelSpec
    hardware: HardwareSpec
    system: System
    cache_config: CacheConfig | None = None
    options: SimOptions = field(default_factory=SimOptions)

    def __post_init__(self) -> None:
        fixed = self.system.cache_config(self.model)
        if fixed is not None:
            self.cache_config = fixed
        if self.cache_config is None:
            raise ConfigError(
                f"policy {self.system.name!r} needs a cache size: give --per-layer K, "
                f"--global-slots N or --cache-gb G"
            )
        if self.options.scope not in ("global", "request"):
            raise ConfigError(f"scope must be 'global' or 'request', got {self.options.scope!r}")
        self.cost = CostModel(self.model, self.hardware)

    # --- memory ---------------------------------------------------------------------------
    def memory_check(self, max_context_tokens: int) -> dict:
        """GPU memory in bytes: dense weights + KV at the longest context + workspace + cache."""
        m, gpu = self.model, self.hardware.gpu
        cache_bytes = self.cache_config.capacity_bytes(m.num_moe_layers, m.num_experts, m.expert_bytes())
        need = {
            "dense_bytes": m.dense_bytes,
            "kv_bytes": m.kv_bytes_per_token * max_context_tokens,
            "workspace_bytes": int(gpu.workspace_gb * 1e9),
            "expert_cache_bytes": cache_bytes,
        }
        base = need["dense_bytes"] + need["kv_bytes"] + need["workspace_bytes"]
        if self.options.check_memory and base > gpu.memory_bytes:
            raise ConfigError(
                f"dense weights ({m.dense_bytes / 1e9:.2f} GB) + KV cache ({need['kv_bytes'] / 1e9:.2f} GB) "
                f"+ workspace ({gpu.workspace_gb} GB) need {base / 1e9:.2f} GB but {self.hardware.name} has "
                f"{gpu.memory_gb} GB: short by {(base - gpu.memory_bytes) / 1e9:.2f} GB"
            )
        if (self.options.check_memory and not getattr(self.system, "ignores_capacity", False)
                and base + cache_bytes > gpu.memory_bytes):
            free = gpu.memory_bytes - base
            raise ConfigError(
                f"expert cache of {cache_bytes / 1e9:.2f} GB ({self.cache_config.describe()}) does not "
                f"fit: {self.hardware.name} has {free / 1e9:.2f} GB left after dense weights, KV cache "
                f"and workspace (at most {int(free // m.expert_bytes())} experts of "
                f"{m.expert_bytes() / 2**20:.0f} MiB)"
            )
        need["total_bytes"] = base + cache_bytes
        return need

    # --- run ------------------------------------------------------------------------------
    def run(self, trace: RoutingTrace) -> RunResult:
        wall0 = time.perf_counter()
        m = self.model
        trace.check_model(m)
        iterations = iterations_batch1(trace)
        memory = self.memory_check(int(trace.position.max()) + 1 if trace.num_tokens else 1)
        cache = ExpertCache(m.num_moe_layers, m.num_experts, m.expert_bytes(), self.cache_config,
                            self.system.eviction, top_k=m.top_k)
        plan = build_access_plan(trace, iterations, m.num_experts)
        self.system.prepare(RunContext(model=m, hardware=self.hardware, cost=self.cost, cache=cache,
                                       trace=trace, plan=plan))
        for key in self.system.initial_residents(m):
            layer, expert = divmod(int(key), m.num_experts)
            cache.admit(layer, expert)
            cache.mark_resident(layer, expert)
        server = LayerServer(self.system, cache, m.expert_bytes(),
                             m.expert_bytes(self.system.low_precision_dtype))
        runner = _DesRun(self, trace, iterations, cache, server)
        runner.execute()
        result = summarise(
            model=m, hardware=self.hardware, system=self.system, cache_config=self.cache_config,
            trace=trace, iterations=iterations, records=runner.records, totals=runner.totals,
            timeline=runner.timeline, memory=memory, cost=self.cost, scope=self.options.scope,
            peak_cache_bytes=cache.peak_used_bytes, engine="des",
        )
        result.metrics["wall_s"] = time.perf_counter() - wall0
        return result


class _DesRun:
    """The SimPy processes of one run."""

    def __init__(self, sim: Simulation, trace: RoutingTrace, iterations: list[Iteration],
                 cache: ExpertCache, server: LayerServer):
        self.sim, self.trace, self.iterations = sim, trace, iterations
        self.cache, self.server, self.cost = cache, server, sim.cost
        self.env = simpy.Environment()
        # One server: copies share the link bandwidth, so two concurrent copies take as long as two
        # serial ones; serving them one at a time keeps demand-before-prefetch ordering exact.
        self.link = simpy.PriorityResource(self.env, capacity=1)
        self.cpu = simpy.Resource(self.env, capacity=1)
        self.copies: dict[int, _Copy] = {}  # key -> its latest copy
        self.slot_copy: dict[tuple[int, int], _Copy] = {}  # (partition, slot) -> latest copy into it
        self.records: list[dict] = []
        self.totals = {"h2d_bytes": 0, "stall_ns": 0, "copies": 0, "prefetch_copies": 0,
                       "cancelled_prefetches": 0, "dropped_gate_mass": 0.0, "degraded_gate_mass": 0.0,
                       "cpu_experts": 0, "expert_compute_ns": 0, "dense_compute_ns": 0, "cpu_ns": 0}
        self.timeline = Timeline() if sim.options.timeline else None
        self._moe_index = {layer: i for i, layer in enumerate(sim.model.moe_layers)}
        self._record_iteration = True

    def execute(self) -> None:
        self.env.process(self._main())
        self.env.run()

    # --- timeline -------------------------------------------------------------------------
    def _row(self, resource, kind, it, layer, expert, start, end, nbytes=0):
        if self.timeline is not None and self._record_iteration and end > start:
            self.timeline.add(resource, kind, it.index, it.request, layer, expert, start, end, nbytes)

    # --- copies ---------------------------------------------------------------------------
    def _start_copy(self, it: Iteration, layer: int, expert: int, slot: int, nbytes: int,
                    priority: int, after: simpy.Event | None) -> None:
        key = self.cache.key(layer, expert)
        copy = _Copy(key=key, done=self.env.event(), promote=self.env.event())
        self.copies[key] = copy
        slot_id = (self.cache.partition(layer), slot)
        previous = self.slot_copy.get(slot_id)
        self.slot_copy[slot_id] = copy
        self.env.process(self._copy(copy, it, layer, expert, nbytes, priority, after, previous))

    def _copy(self, copy: _Copy, it, layer, expert, nbytes, priority, after, previous):
        if after is not None and not after.triggered:
            yield after
        if previous is not None and not previous.done.triggered:
            yield previous.done  # the slot's previous copy must land before this one overwrites it
        req = self.link.request(priority=priority)
        if priority > 0:
            result = yield req | copy.promote
            if req not in result:
                req.cancel()
                req = self.link.request(priority=0)
                yield req
        else:
            yield req
        if copy.cancelled:  # evicted before it started: dropped, costs nothing
            self.link.release(req)
            self.totals["cancelled_prefetches"] += 1
            copy.done.succeed()
            return
        copy.started = True
        start = self.env.now
        yield self.env.timeout(self.cost.transfer_time_ns(nbytes))
        self.link.release(req)
        self.totals["h2d_bytes"] += nbytes
        self.totals["copies"] += 1
        if priority > 0:
            self.totals["prefetch_copies"] += 1
        self._row("link", "prefetch" if priority > 0 else "copy", it, layer, expert, start, self.env.now, nbytes)
        if self.copies.get(copy.key) is copy:
            self.cache.mark_resident(layer, expert)
        copy.done.succeed()

    def _cancel_evicted(self, keys: list[int]) -> None:
        for key in keys:
            copy = self.copies.get(key)
            if copy is not None and not copy.started and not copy.done.triggered:
                copy.cancelled = True
                if not copy.promote.triggered:
                    copy.promote.succeed()  # wake it so it releases the link request at once
            if copy is not None:
                del self.copies[key]

    # --- CPU experts ----------------------------------------------------------------------
    def _cpu_expert(self, it, layer, expert, tokens, done: simpy.Event):
        with self.cpu.request() as req:
            yield req
            start = self.env.now
            t = self.cost.cpu_expert_time_ns(tokens)
            yield self.env.timeout(t)
            self.totals["cpu_ns"] += t
            self._row("cpu", "cpu_expert", it, layer, expert, start, self.env.now)
        done.succeed()

    # --- main process: the GPU compute stream ---------------------------------------------
    def _main(self):
        env, trace, m = self.env, self.trace, self.sim.model
        opts = self.sim.options
        current_request = None
        for it in self.iterations:
            if it.request != current_request:
                current_request = it.request
                if opts.scope == "request":
                    self._cancel_evicted(list(self.copies))
                    self.cache.reset()
                self.sim.system.on_request_start(it.request)
            window = opts.timeline_iterations
            self._record_iteration = window is None or window[0] <= it.index < window[1]
            start_iter = env.now
            stats = {"hits": 0, "misses": 0, "stall_ns": 0, "experts": 0}
            tokens = np.arange(it.start, it.stop)
            for layer in range(m.num_layers):
                t0 = env.now
                t_dense = self.cost.dense_layer_time_ns(it.num_tokens, it.context_tokens)
                yield env.timeout(t_dense)
                self.totals["dense_compute_ns"] += t_dense
                self._row("gpu", "dense", it, layer, -1, t0, env.now)
                moe = self._moe_index.get(layer)
                if moe is not None:
                    yield from self._moe_layer(it, moe, tokens, stats)
            self.records.append({
                "iteration": it.index, "request": it.request, "phase": it.phase,
                "tokens": it.num_tokens, "start_ns": start_iter, "end_ns": env.now, **stats,
            })

    def _moe_layer(self, it: Iteration, layer: int, tokens: np.ndarray, stats: dict):
        env, trace, cache = self.env, self.trace, self.cache
        weights = None if trace.weights is None else trace.weights[it.start:it.stop, layer]
        obs = self.server.observe(now_ns=env.now, iteration=it.index, layer=layer, tokens=tokens,
                                  experts=trace.experts[it.start:it.stop, layer], weights=weights,
                                  phase=it.phase, trace=trace)
        plan, _ = self.server.serve(obs)
        layer_start = env.now
        self._cancel_evicted(plan.evicted)
        compute_done = [env.event() for _ in plan.items]
        # Demand copies, in serve order, then prefetches.
        for item in plan.items:
            key = cache.key(layer, item.expert)
            if item.hit and item.loading_at_lookup:
                copy = self.copies.get(key)
                if copy is not None and not copy.started and not copy.promote.triggered:
                    copy.promote.succeed()  # needed now: a queued prefetch becomes a demand copy
            if item.copy_bytes:
                after = compute_done[item.wait_compute] if item.wait_compute >= 0 else None
                self._start_copy(it, layer, item.expert, item.slot, item.copy_bytes, 0, after)
        for pf in plan.prefetches:
            self._start_copy(it, pf.layer, pf.expert, pf.slot, pf.copy_bytes, pf.priority, None)
        cpu_done = []
        stall = 0
        lowp = self.sim.system.low_precision_dtype
        for idx, item in enumerate(plan.items):
            if item.action is MissAction.SKIP:
                compute_done[idx].succeed()
                continue
            if item.action is MissAction.CPU:
                done = env.event()
                env.process(self._cpu_expert(it, layer, item.expert, item.tokens, done))
                cpu_done.append(done)
                compute_done[idx].succeed()
                continue
            copy = self.copies.get(cache.key(layer, item.expert))
            if copy is not None and not copy.done.triggered:
                t0 = env.now
                yield copy.done
                stall += env.now - t0
                self._row("gpu", "stall", it, layer, item.expert, t0, env.now)
            t0 = env.now
            t = self.cost.expert_time_ns(item.tokens, low_precision_dtype=lowp if item.low_precision else None)
            yield env.timeout(t)
            self.totals["expert_compute_ns"] += t
            self._row("gpu", "expert", it, layer, item.expert, t0, env.now)
            compute_done[idx].succeed()
        for done in cpu_done:
            if not done.triggered:
                t0 = env.now
                yield done
                stall += env.now - t0
                self._row("gpu", "stall", it, layer, -1, t0, env.now)
        stats["hits"] += plan.hits
        stats["misses"] += plan.misses
        stats["stall_ns"] += stall
        stats["experts"] += len(plan.items)
        self.totals["stall_ns"] += stall
        self.totals["dropped_gate_mass"] += plan.dropped_gate_mass
        self.totals["degraded_gate_mass"] += plan.degraded_gate_mass
        self.totals["cpu_experts"] += plan.cpu_experts
        outcome = LayerOutcome(layer=layer, hits=plan.hits, misses=plan.misses, stall_ns=stall,
                               start_ns=layer_start, end_ns=env.now)
        self.server.finish(obs, plan, outcome)
