"""Calibration: micro-benchmarks of one device that fill a profile (see ``profile.py``).

Each table times exactly the operation the replay executes and records on its timeline, with the
same device code: the copy of ``bytes`` into a slot (pinned, and from pageable memory), one
expert's ``apply_expert`` over ``tokens`` tokens, one layer's dense stand-in over ``tokens`` new
tokens at a ``context`` length, and ``apply_cpu_expert``. Every point is the median of ``reps``
timed runs after untimed warm-up runs; CUDA times come from CUDA events. Experts rotate over
several device rows so that a small expert is not served from the GPU's L2 cache more than in
a replay.
"""
from __future__ import annotations

import numpy as np
import torch

from expertsim.real_runner.device import torch_dtype
from expertsim.real_runner.profile import PROFILE_FORMAT, PROFILE_VERSION, fit_copy_line, now_iso
from expertsim.real_runner.weights import DenseStandIn, ExpertStore, apply_cpu_expert, apply_expert, token_groups
from expertsim.specs.model import ModelSpec


def _grid(limit: int, start: int = 1) -> list[int]:
    """Powers of two from ``start`` below ``limit``, then ``limit`` itself."""
    out, v = [], start
    while v < limit:
        out.append(v)
        v *= 2
    return out + [limit]


def _median_ns(dev, fn, reps: int, warmup: int = 2) -> int:
    """Median over ``reps`` of the compute-stream time of ``fn()`` (stamps around it), each run
    from cold caches: in a replay, the experts and layers in between evict a layer's weights."""
    for _ in range(warmup):
        fn()
    dev.synchronize()
    dev.start_clock()
    stamps = []
    for _ in range(reps):
        dev.flush_caches()
        a = dev.stamp()
        fn()
        stamps.append((a, dev.stamp()))
    dev.synchronize()
    return int(np.median([dev.ns(b) - dev.ns(a) for a, b in stamps]))


def _copy_table(dev, src_flat: torch.Tensor, dst_flat: torch.Tensor, sizes: list[int], reps: int) -> list[int]:
    out = []
    for n in sizes:
        for _ in range(2):  # warm-up
            dev.wait(dev.copy(dst_flat[:n], src_flat[:n], dev.stamp()))
        dev.synchronize()
        dev.start_clock()
        ops = []
        for _ in range(reps):
            ops.append(dev.copy(dst_flat[:n], src_flat[:n], dev.stamp()))
            dev.wait(ops[-1])
            dev.synchronize()  # isolated copies: each one's own time, no queueing
        out.append(int(np.median([b - a for a, b in (dev.copy_ns(op) for op in ops)])))
    return out


class _Decision:
    """The replay's host work at one MoE layer, for the dense table: the LayerServer's observe,
    serve and finish under LRU and the token grouping, on random routings of a given number of
    tokens. The cache holds half the layer's experts, so lookups both hit and miss (a miss
    admits and evicts, a hit does not: the work lies between all-hit and all-miss layers)."""

    def __init__(self, spec: ModelSpec, seed: int = 0):
        from expertsim.policies import CacheConfig, ExpertCache, RunContext, make_policy
        from expertsim.policies.serve import LayerServer

        self.spec = spec
        self.system = make_policy("lru")
        eb = spec.expert_bytes()
        slots = max(spec.top_k, spec.num_experts // 2)
        self.cache = ExpertCache(1, spec.num_experts, eb, CacheConfig(per_layer=slots), self.system.eviction,
                                 top_k=spec.top_k)
        self.system.prepare(RunContext(model=spec, hardware=None, cost=None, cache=self.cache, trace=None))
        self.server = LayerServer(self.system, self.cache, eb, eb)
        self.rng = np.random.default_rng(seed)

    def routing(self, tokens: int) -> np.ndarray:
        scores = self.rng.random((tokens, self.spec.num_experts))
        return np.argsort(scores, axis=1)[:, : self.spec.top_k].astype(np.uint8)

    def __call__(self, experts: np.ndarray) -> None:
        from expertsim.policies import LayerOutcome

        obs = self.server.observe(now_ns=0, iteration=0, layer=0, tokens=np.arange(len(experts)),
                                  experts=experts, weights=None, phase=1, trace=None)
        plan, _ = self.server.serve(obs)
        token_groups(experts, None, self.spec.top_k)
        self.server.finish(obs, plan, LayerOutcome(layer=0, hits=plan.hits, misses=plan.misses, stall_ns=0,
                                                   start_ns=-1, end_ns=-1))


def calibrate(spec: ModelSpec, dev, *, max_tokens: int = 256, max_context: int = 2048, reps: int = 7,
              quick: bool = False, store: ExpertStore | None = None, progress=None) -> dict:
    """Measure ``dev`` for ``spec`` (a shrunk spec on small machines) and return a profile dict.

    ``max_tokens``: the largest pass to time (the trace's longest prefill); ``max_context``: the
    longest KV length; ``quick``: fewer points and repetitions (CI)."""
    say = progress or (lambda msg: None)
    dtype = torch_dtype(spec.dtype)
    reps = 3 if quick else reps
    store = store if store is not None else ExpertStore(spec, dev, dtype)
    expert_bytes = spec.expert_bytes()
    profile = {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "device": dev.name,
               "model": spec.name, "created": now_iso(), "expert_bytes": expert_bytes}
    import dataclasses

    profile["model_spec"] = dataclasses.asdict(spec)
    with dev.compute_context():
        # --- copies ---------------------------------------------------------------------
        say("calibrate: copy bandwidth vs size")
        n_rows = min(8, store.host.shape[0])
        src = store.host[0].view(torch.uint8)
        dst = dev.empty((n_rows, store.host.shape[1]), dtype)
        dst_flat = dst[0].view(torch.uint8)
        first = 1 << 16 if not quick else 1 << 18
        sizes = _grid(expert_bytes, start=min(first, expert_bytes))
        if quick:
            sizes = sizes[::2] if sizes[::2][-1] == expert_bytes else sizes[::2] + [expert_bytes]
        copy_ns = _copy_table(dev, src, dst_flat, sizes, reps)
        profile["copy"] = {"bytes": sizes, "ns": copy_ns}
        overhead, bandwidth = fit_copy_line(sizes, copy_ns)
        profile["copy_overhead_ns"], profile["copy_bandwidth_gbps"] = round(overhead), round(bandwidth, 3)
        pageable = dev.host_empty(store.host.shape[1], dtype, pinned=False).copy_(store.host[0])
        pageable_sizes = [s for s in sizes if s >= expert_bytes // 64] or [expert_bytes]
        profile["copy_pageable"] = {"bytes": pageable_sizes,
                                    "ns": _copy_table(dev, pageable.view(torch.uint8), dst_flat, pageable_sizes, reps)}
        for r in range(n_rows):
            dst[r].copy_(store.host[r])
        host_rows = [store.host[r] for r in range(n_rows)]

        # --- expert FFN vs tokens -------------------------------------------------------
        say("calibrate: expert FFN vs tokens")
        gen = torch.Generator().manual_seed(3)
        base = torch.randn(max_tokens, spec.d_model, generator=gen).to(dtype).to(dev.torch_device)
        token_grid = _grid(max_tokens)
        if quick:
            token_grid = sorted({1, 2, *token_grid[2::2], max_tokens})
        expert_ns, cpu_ns = [], []
        # The CPU path serves a few tokens (decode); a long prefill on the CPU would take minutes
        # at full width, so its table stops at 32 tokens and extrapolates linearly.
        cpu_grid = [t for t in token_grid if t <= 32] or [1]
        for t in token_grid:
            x = base[:t].clone()
            h = torch.nn.functional.rms_norm(x, (x.shape[-1],))
            rows = np.arange(t)
            gate = np.full(t, 0.5, dtype=np.float32)
            state = {"r": 0}

            def expert_once():
                state["r"] = (state["r"] + 1) % n_rows
                apply_expert(x, h, rows, gate, dst[state["r"]], spec)

            expert_ns.append(_median_ns(dev, expert_once, reps))

            def cpu_once():
                state["r"] = (state["r"] + 1) % n_rows
                apply_cpu_expert(x, h, rows, gate, host_rows[state["r"]], spec)

            if t in cpu_grid:
                cpu_ns.append(_median_ns(dev, cpu_once, max(1, reps // 2), warmup=1))
        profile["expert"] = {"tokens": token_grid, "ns": expert_ns}
        profile["cpu_expert"] = {"tokens": cpu_grid, "ns": cpu_ns}

        # --- dense stand-in vs tokens x context -----------------------------------------
        say("calibrate: dense layer vs tokens and context")
        context_grid = _grid(max_context, start=64)
        if quick:
            context_grid = sorted({64, max_context})
        dense = DenseStandIn(spec, dev, dtype, max(max_context, max_tokens), seed=1)
        decide = _Decision(spec)
        dense_tokens = token_grid if not quick else sorted({1, max_tokens})
        table, decision_ns = [], []
        for t in dense_tokens:
            routings = [decide.routing(t) for _ in range(16)]
            state = {"i": 0}

            def decision_once():
                state["i"] = (state["i"] + 1) % len(routings)
                decide(routings[state["i"]])

            decision_ns.append(_median_ns(dev, decision_once, reps))
            row = []
            for c in context_grid:
                ctx = max(c, t)
                x = base[:t].clone()

                def layer_once():
                    dense(0, x, slice(ctx - t, ctx), ctx)
                    decision_once()

                row.append(_median_ns(dev, layer_once, reps))
            table.append(row)
        profile["dense"] = {"tokens": dense_tokens, "context": context_grid, "ns": table}
        profile["decision"] = {"tokens": dense_tokens, "ns": decision_ns}
    profile["notes"] = (f"medians of {reps} runs after warm-up, each from cold caches; expert and dense "
                        f"tables time the real runner's own operations; dense = the dense stand-in plus "
                        f"the runner's per-layer decision (LayerServer observe/serve/finish under LRU with half "
                        f"the experts cached, "
                        f"token grouping; alone in 'decision'); dense points with tokens > context are "
                        f"measured at context = tokens")
    dev.synchronize()
    return profile
