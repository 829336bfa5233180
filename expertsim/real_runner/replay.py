"""Replay a routing trace on a device with real tensors, under the simulator's own policy objects.

The walk is the simulator's (``expertsim.sim.engine``): batch 1, the trace's passes in order
(:func:`iterations`), and in each pass every model layer: the dense stand-in, then at an MoE
layer the shared :class:`~expertsim.policies.serve.LayerServer` applies the System's decisions to
the shared :class:`~expertsim.policies.cache.ExpertCache` (so hits, misses, evictions and
prefetches are the simulator's, decided by the same code), and this module executes the plan:

1. once the layer's attention is done (a stamp on the compute stream, the point where a real
   router has decided), the demand copies of the missed experts start on the copy stream in
   serve order, then the admitted prefetches;
2. the experts compute in serve order on the compute stream, each first waiting for the copy
   of its expert (demand or an earlier prefetch still in flight): the wait is the stall;
3. a copy into room freed by an expert of the same layer (``wait_compute``) is issued right
   after that expert's compute, and waits for it.

One copy stream serves copies first-in first-out (one DMA engine): a demand copy cannot overtake
a queued prefetch, and an evicted prefetch that has not started still runs. The simulator models
exactly this link with ``SimOptions(link_queue="fifo")``, which ``expertsim validate`` uses (its
default link lets demand copies go first and drops evicted queued prefetches).
Low-precision copies (MissAction.LOW_PRECISION) are not executed (no quantised kernels here);
experts computed on the CPU (MissAction.CPU) run synchronously on the host.

The timeline has the simulator's rows (resource, kind, iteration, request, layer, expert,
start_ns, end_ns, bytes): ``gpu dense`` (model layer), ``gpu expert``, ``gpu stall``, ``link
copy``/``link prefetch``, ``cpu cpu_expert`` (MoE layer). A pass's latency runs from the end of
the previous pass to the end of its last compute, as in the simulator, whose compute stream has
no gaps.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from expertsim.errors import ConfigError
from expertsim.policies import AccessPlan, CacheConfig, ExpertCache, LayerOutcome, MissAction, RunContext, System
from expertsim.policies.records import RunTotals
from expertsim.policies.serve import LayerServer
from expertsim.real_runner.device import torch_dtype
from expertsim.real_runner.weights import (
    DenseStandIn,
    ExpertStore,
    SlotPool,
    apply_cpu_expert,
    apply_expert,
    ffn,
    token_groups,
)
from expertsim.specs.model import ModelSpec
from expertsim.traces.trace import RoutingTrace

TIMELINE_COLUMNS = ("resource", "kind", "iteration", "request", "layer", "expert", "start_ns", "end_ns", "bytes")


@dataclass(frozen=True)
class Pass:
    """One forward pass over tokens ``start:stop`` (the simulator's ``Iteration``)."""

    index: int
    start: int
    stop: int
    request: int
    phase: int
    context_tokens: int

    @property
    def num_tokens(self) -> int:
        return self.stop - self.start


def iterations(trace: RoutingTrace) -> list[Pass]:
    """Batch 1: the trace's passes in order, as ``expertsim.sim.workload.iterations_batch1``."""
    starts = trace.pass_starts()
    return [Pass(index=i, start=a, stop=b, request=int(trace.request[a]), phase=int(trace.phase[a]),
                 context_tokens=int(trace.position[b - 1]) + 1)
            for i, (a, b) in enumerate(zip(starts[:-1].tolist(), starts[1:].tolist()))]


def access_plan(trace: RoutingTrace, passes: list[Pass], num_experts: int) -> AccessPlan:
    """The LayerServer's lookup order (for oracle policies), as the simulator builds it."""
    keys = []
    for it in passes:
        block = trace.experts[it.start:it.stop]
        for layer in range(trace.num_layers):
            keys.append(layer * num_experts + np.unique(block[:, layer]).astype(np.int64))
    flat = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)
    return AccessPlan(keys=flat, num_experts=num_experts)


@dataclass
class ReplayResult:
    """What a replay measured: per-pass records, totals, the timeline, the layer log."""

    records: list[dict]
    totals: RunTotals
    timeline: dict  # column -> list, TIMELINE_COLUMNS
    layer_log: list[tuple]  # (iteration, moe layer, hit flags in serve order, copied experts, prefetched keys)
    outputs_finite: bool
    config: dict = field(default_factory=dict)

    def metrics(self) -> dict:
        return summarise_records(self.records, self.totals)


def summarise_records(records: list[dict], totals: RunTotals) -> dict:
    """Headline metrics with the simulator's names and definitions (``expertsim.sim.metrics``)."""
    end = np.array([r["end_ns"] for r in records], dtype=np.int64)
    start = np.array([r["start_ns"] for r in records], dtype=np.int64)
    phase = np.array([r["phase"] for r in records], dtype=np.int64)
    hits = sum(r["hits"] for r in records)
    misses = sum(r["misses"] for r in records)
    tpot = (end - start)[phase == 1]
    return {
        "iterations": len(records),
        # The passes' own time (contiguous passes: last end - first start); a request-scope
        # reload of preloaded experts between passes is not in it.
        "total_s": float((end - start).sum()) / 1e9 if len(end) else 0.0,
        "tpot_ms": float(tpot.mean()) / 1e6 if len(tpot) else float("nan"),
        "tpot_p50_ms": float(np.percentile(tpot, 50)) / 1e6 if len(tpot) else float("nan"),
        "hit_rate": hits / (hits + misses) if hits + misses else float("nan"),
        "hits": int(hits), "misses": int(misses),
        "h2d_gb": totals.h2d_bytes / 1e9,
        "h2d_copies": totals.copies,
        "prefetch_copies": totals.prefetch_copies,
        "stall_s": totals.stall_ns / 1e9,
    }


class Replayer:
    """Real tensors for ``spec`` on ``device``, driven by ``system`` over a cache of
    ``cache_config`` (or the system's own). ``run(trace)`` returns a :class:`ReplayResult`."""

    def __init__(self, spec: ModelSpec, system: System, device, cache_config: CacheConfig | None = None,
                 *, scope: str = "global", hardware=None, seed: int = 0, timeline: bool = True,
                 store: ExpertStore | None = None):
        self.spec, self.system, self.device = spec, system, device
        fixed = system.cache_config(spec)
        self.cache_config = fixed if fixed is not None else cache_config
        if self.cache_config is None:
            raise ConfigError(f"policy {system.name!r} needs a cache size: give per_layer, global_slots "
                              f"or budget_bytes")
        if scope not in ("global", "request"):
            raise ConfigError(f"scope must be 'global' or 'request', got {scope!r}")
        self.scope, self.hardware, self.seed, self.keep_timeline = scope, hardware, seed, timeline
        self.dtype = torch_dtype(spec.dtype)
        self.store = store if store is not None else ExpertStore(spec, device, self.dtype, seed=seed)

    # --- setup ----------------------------------------------------------------------------
    def _slots_per_partition(self, cache: ExpertCache) -> int:
        return int(cache.capacity[0] // cache.expert_bytes)

    def _row(self, cache: ExpertCache, layer: int, slot: int) -> int:
        if not 0 <= slot < self.slots_pp:
            raise ConfigError(f"cache slot {slot} outside the {self.slots_pp} rows of the device pool "
                              f"(entries smaller than an expert are not supported by the real runner)")
        return cache.partition(layer) * self.slots_pp + slot

    def run(self, trace: RoutingTrace, *, unsafe_skip_copy_wait: bool = False) -> ReplayResult:
        """Replay ``trace``. ``unsafe_skip_copy_wait`` computes without waiting for copies (for
        the test that shows the NaN-poisoned slots catch a missing dependency)."""
        spec, dev = self.spec, self.device
        trace.check_model(spec)
        passes = iterations(trace)
        cache = ExpertCache(spec.num_moe_layers, spec.num_experts, spec.expert_bytes(), self.cache_config,
                            self.system.eviction, top_k=spec.top_k)
        self.slots_pp = self._slots_per_partition(cache)
        pool = SlotPool(spec, dev, self.dtype, cache.num_partitions * self.slots_pp + 1)
        scratch = pool.rows - 1
        self.system.prepare(RunContext(model=spec, hardware=self.hardware, cost=None, cache=cache,
                                       trace=trace, plan=access_plan(trace, passes, spec.num_experts)))
        with dev.compute_context():
            # The system's initial residents (a static hot set, every expert for all-on-GPU)
            # belong to the deployment: ExpertCache.preload, so a request-scope reset loads them
            # again, as in the simulator.
            cache.preload(self.system.initial_residents(spec))
            self._load_preloaded(cache, pool)
            max_tokens = max((p.num_tokens for p in passes), default=1)
            max_context = int(trace.position.max()) + 1 if trace.num_tokens else 1
            dense = DenseStandIn(spec, dev, self.dtype, max_context, seed=self.seed + 1)
            gen = torch.Generator().manual_seed(self.seed + 2)
            inputs = torch.randn(max_tokens, spec.d_model, generator=gen).to(self.dtype).to(dev.torch_device)
            self._warm_up(dense, pool, scratch, inputs)
        server = LayerServer(self.system, cache, spec.expert_bytes(),
                             spec.expert_bytes(self.system.low_precision_dtype))
        run = _Run(self, trace, cache, server, pool, dense, inputs, unsafe_skip_copy_wait)
        with dev.compute_context():
            dev.start_clock()
            run.last = dev.stamp()
            run.execute(passes)
            dev.synchronize()
        return run.result(passes)

    def _load_preloaded(self, cache: ExpertCache, pool: SlotPool) -> None:
        """Copy the preloaded experts' weights into their rows, synchronously and outside the
        measured passes (preloading is free in the simulator: it is the deployment's state)."""
        for key in cache.preloaded:
            layer = int(key) // self.spec.num_experts
            pool.data[self._row(cache, layer, cache.slot_by_key[int(key)])].copy_(self.store.row(int(key)))

    def _warm_up(self, dense: DenseStandIn, pool: SlotPool, scratch: int, inputs: torch.Tensor) -> None:
        """Run every kind of operation once (kernels, allocator, copy path) before the clock."""
        dev, spec = self.device, self.spec
        for n in sorted({1, inputs.shape[0]}):
            x, h = dense(0, inputs[:n].clone(), slice(0, n), n)
            apply_expert(x, h, np.arange(n), np.ones(n, dtype=np.float32), self.store.row(0).to(dev.torch_device), spec)
        op = dev.copy(pool.data[scratch], self.store.row(0), dev.stamp())
        dev.wait(op)
        ffn(inputs[:1], pool.data[scratch], spec)
        dev.synchronize()
        pool.data[scratch].fill_(float("nan"))
        dev.synchronize()


class _Run:
    """The state of one replay (the simulator's ``_DesRun`` with real work instead of timeouts)."""

    def __init__(self, rep: Replayer, trace, cache, server, pool, dense, inputs, skip_wait):
        self.rep, self.trace, self.cache, self.server = rep, trace, cache, server
        self.pool, self.dense, self.inputs, self.skip_wait = pool, dense, inputs, skip_wait
        self.dev, self.spec = rep.device, rep.spec
        self.inflight: dict[int, object] = {}  # key -> its latest copy op
        self.rows: list[tuple] = []  # timeline rows with unresolved stamps
        self.copy_rows: list[tuple] = []  # (kind, iteration, request, layer, expert, op)
        self.pass_stamps: list[tuple] = []  # (start stamp, end stamp) per pass
        self.pass_stats: list[dict] = []
        self.layer_log: list[tuple] = []
        self.finite: list[torch.Tensor] = []
        self.totals = RunTotals()
        self.moe_index = {layer: i for i, layer in enumerate(self.spec.moe_layers)}
        self.host_origin = time.perf_counter_ns()
        self.last = None  # the compute stream's latest stamp (set when the clock starts)
        self.reloaded: set[int] = set()  # passes preceded by a request-scope reload of the preloaded experts

    def execute(self, passes: list[Pass]) -> None:
        system, current = self.rep.system, None
        for it in passes:
            if it.request != current:
                current = it.request
                if self.rep.scope == "request":
                    self.cache.reset()
                    self.inflight.clear()
                    if len(self.cache.preloaded):
                        self.rep._load_preloaded(self.cache, self.pool)
                        self.dev.synchronize()
                        self.last = self.dev.stamp()
                        self.reloaded.add(it.index)
                system.on_request_start(it.request)
            stats = {"hits": 0, "misses": 0, "experts": 0}
            start = self.last
            x = self.inputs[: it.num_tokens].clone()
            positions = slice(int(self.trace.position[it.start]), int(self.trace.position[it.stop - 1]) + 1)
            for layer in range(self.spec.num_layers):
                x, h = self.dense(layer, x, positions, it.context_tokens)
                attention_done = self.dev.stamp()
                moe = self.moe_index.get(layer)
                if moe is None:
                    self._row("gpu", "dense", it, layer, -1, attention_done)
                else:
                    self._moe_layer(it, moe, layer, x, h, attention_done, stats)
            self.finite.append(torch.isfinite(x).all())
            self.pass_stamps.append((start, self.last))
            self.pass_stats.append(stats)

    def _row(self, resource: str, kind: str, it: Pass, layer: int, expert: int, end=None) -> None:
        """A compute-stream row from the end of the previous one to ``end`` (default: now), so the
        rows tile the stream: host work between operations (the policy's decision, bookkeeping)
        is charged to the row it precedes, as the calibration charges it."""
        end = self.dev.stamp() if end is None else end
        self.rows.append((resource, kind, it.index, it.request, layer, expert, self.last, end, 0))
        self.last = end

    def _copy(self, it: Pass, layer: int, expert: int, slot: int, nbytes: int, after, prefetch: bool):
        key = self.cache.key(layer, expert)
        row = self.rep._row(self.cache, layer, slot)
        op = self.dev.copy(self.pool.data[row], self.rep.store.row(key), after)
        self.inflight[key] = op
        self.copy_rows.append(("prefetch" if prefetch else "copy", it.index, it.request, layer, expert, op))
        self.totals.h2d_bytes += nbytes
        self.totals.copies += 1
        self.totals.prefetch_copies += int(prefetch)

    def _moe_layer(self, it: Pass, layer: int, model_layer: int, x: torch.Tensor, h: torch.Tensor, attention_done,
                   stats: dict) -> None:
        """Serve one MoE layer; the experts' gated outputs are added to the residual ``x`` in place.
        The dense row of the layer ends once the decision is taken and its copies issued (a real
        router decides after attention; the calibration times the same span)."""
        trace, cache, dev, spec = self.trace, self.cache, self.dev, self.spec
        experts = trace.experts[it.start:it.stop, layer]
        weights = None if trace.weights is None else trace.weights[it.start:it.stop, layer]
        obs = self.server.observe(now_ns=time.perf_counter_ns() - self.host_origin, iteration=it.index,
                                  layer=layer, tokens=np.arange(it.start, it.stop), experts=experts,
                                  weights=weights, phase=it.phase, trace=trace)
        plan, _ = self.server.serve(obs)
        # The copies this layer's hits wait for, taken before evictions: a hit released mid-layer
        # (its room given to a later miss) is evicted yet still computes from its landing copy.
        hit_copies = {cache.key(layer, item.expert): self.inflight.pop(cache.key(layer, item.expert), None)
                      for item in plan.items if item.hit}
        for key in plan.evicted:  # an evicted entry's copy (if any) no longer serves its key
            self.inflight.pop(key, None)
        deferred: dict[int, list[int]] = {}
        for idx, item in enumerate(plan.items):
            if item.action is MissAction.LOW_PRECISION:
                raise ConfigError(f"system {self.rep.system.name!r} asked for a low-precision copy; "
                                  f"the real runner executes full-precision copies only")
            if item.copy_bytes:
                if item.wait_compute >= 0:
                    deferred.setdefault(item.wait_compute, []).append(idx)
                else:
                    self._copy(it, layer, item.expert, item.slot, item.copy_bytes, attention_done, False)
        # A prefetch may take the room of an expert this layer released mid-layer (its compute
        # still to come): then the prefetches wait for the layer's computes.
        late_prefetch = any(item.released for item in plan.items)
        if not late_prefetch:
            for pf in plan.prefetches:
                self._copy(it, pf.layer, pf.expert, pf.slot, pf.copy_bytes, attention_done, True)
        groups = token_groups(experts, weights, spec.top_k)
        self._row("gpu", "dense", it, model_layer, -1)
        for idx, item in enumerate(plan.items):
            key = cache.key(layer, item.expert)
            rows, gate = groups[item.expert]
            if item.action is MissAction.SKIP:
                self.totals.dropped_gate_mass += item.gate_mass
            elif item.action is MissAction.CPU:
                apply_cpu_expert(x, h, rows, gate, self.rep.store.row(key), spec)
                self._row("cpu", "cpu_expert", it, layer, item.expert)
                self.totals.cpu_experts += 1
            else:
                op = hit_copies.get(key) if item.hit else self.inflight.pop(key, None)
                if op is not None and not self.skip_wait:
                    # The compute starts when the copy has landed: the row up to here is the
                    # stall (empty, and dropped, when the copy was already done).
                    dev.wait(op)
                    self._row("gpu", "stall", it, layer, item.expert)
                apply_expert(x, h, rows, gate, self.pool.data[self.rep._row(cache, layer, item.slot)], spec)
                self._row("gpu", "expert", it, layer, item.expert)
            for j in deferred.get(idx, ()):
                other = plan.items[j]
                self._copy(it, layer, other.expert, other.slot, other.copy_bytes, self.last, False)
        if late_prefetch:
            for pf in plan.prefetches:
                self._copy(it, pf.layer, pf.expert, pf.slot, pf.copy_bytes, self.last, True)
        stats["hits"] += plan.hits
        stats["misses"] += plan.misses
        stats["experts"] += len(plan.items)
        self.layer_log.append((it.index, layer, tuple(bool(i.hit) for i in plan.items),
                               tuple(i.expert for i in plan.items if i.copy_bytes),
                               tuple(cache.key(p.layer, p.expert) for p in plan.prefetches)))
        # Timing feedback is not known until the end on an asynchronous device: none is given.
        self.server.finish(obs, plan, LayerOutcome(layer=layer, hits=plan.hits, misses=plan.misses,
                                                   stall_ns=0, start_ns=-1, end_ns=-1))

    def result(self, passes: list[Pass]) -> ReplayResult:
        dev = self.dev
        cols: dict[str, list] = {c: [] for c in TIMELINE_COLUMNS}

        def add(row):
            for c, v in zip(TIMELINE_COLUMNS, row):
                cols[c].append(v)

        stall_by_pass = np.zeros(len(passes), dtype=np.int64)
        for resource, kind, i, req, layer, expert, a, b, nbytes in self.rows:
            start, end = dev.ns(a), dev.ns(b)
            if kind == "stall":
                stall_by_pass[i] += max(end - start, 0)
            if self.rep.keep_timeline and end > start:
                add((resource, kind, i, req, layer, expert, start, end, nbytes))
        for kind, i, req, layer, expert, op in self.copy_rows:
            start, end = dev.copy_ns(op)
            if self.rep.keep_timeline:
                add(("link", kind, i, req, layer, expert, start, end, op.nbytes))
        records = []
        prev_end = None
        for it, (a, b), stats, stall in zip(passes, self.pass_stamps, self.pass_stats, stall_by_pass):
            start, end = dev.ns(a), dev.ns(b)
            # Contiguous, as in the simulator, except after a request-scope reload of the
            # preloaded experts: that reload is the deployment's, outside every pass.
            start = start if prev_end is None or it.index in self.reloaded else prev_end
            prev_end = end
            records.append({"iteration": it.index, "request": it.request, "phase": it.phase,
                            "tokens": it.num_tokens, "start_ns": start, "end_ns": end,
                            "stall_ns": int(stall), **stats})
        self.totals.stall_ns = int(stall_by_pass.sum())
        finite = bool(torch.stack(self.finite).all().item()) if self.finite else True
        config = {"model": self.spec.name, "policy": self.rep.system.label,
                  "cache": self.rep.cache_config.describe(), "device": dev.name, "scope": self.rep.scope}
        return ReplayResult(records=records, totals=dataclasses.replace(self.totals), timeline=cols,
                            layer_log=self.layer_log, outputs_finite=finite, config=config)
