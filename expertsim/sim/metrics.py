"""Run metrics and the per-run timeline."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class Timeline:
    """Every copy, compute and stall of a run as rows
    (resource, kind, iteration, request, layer, expert, start_ns, end_ns, bytes).

    resource: gpu (kinds dense, expert, stall), link (copy, prefetch; one row per chunk),
    storage (read), cpu (cpu_expert). request is -1 for an iteration that batches several
    requests; expert is -1 for dense rows and for stalls on CPU experts."""

    COLUMNS = ("resource", "kind", "iteration", "request", "layer", "expert", "start_ns", "end_ns", "bytes")

    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def add(self, resource, kind, iteration, request, layer, expert, start_ns, end_ns, nbytes=0) -> None:
        self.rows.append((resource, kind, int(iteration), int(request), int(layer), int(expert),
                          int(start_ns), int(end_ns), int(nbytes)))

    def __len__(self) -> int:
        return len(self.rows)

    def to_dict(self) -> dict[str, list]:
        cols = list(zip(*self.rows)) if self.rows else [[] for _ in self.COLUMNS]
        return {name: list(col) for name, col in zip(self.COLUMNS, cols)}

    def to_frame(self):
        import polars as pl

        return pl.DataFrame(self.to_dict(), schema={
            "resource": pl.String, "kind": pl.String, "iteration": pl.Int64, "request": pl.Int64,
            "layer": pl.Int64, "expert": pl.Int64, "start_ns": pl.Int64, "end_ns": pl.Int64,
            "bytes": pl.Int64})


TIMELINE_SUFFIXES = (".json", ".json.gz", ".parquet")


def timeline_format(path) -> str:
    """The format a timeline path asks for by its suffix: ``.json`` (Chrome trace JSON),
    ``.json.gz`` (the same, gzipped) or ``.parquet`` (the timeline's columns)."""
    from expertsim.errors import ConfigError

    name = str(path).lower()
    for suffix in sorted(TIMELINE_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    raise ConfigError(f"--timeline {str(path)!r}: give a .json or .json.gz file (Chrome trace, opens in "
                      f"Perfetto) or a .parquet file (the timeline's columns)")


def write_timeline(timeline: "Timeline | None", path) -> None:
    """Write a timeline in the format its suffix names (see :func:`timeline_format`)."""
    from pathlib import Path

    fmt = timeline_format(path)
    if timeline is None:
        raise ValueError("the run recorded no timeline; run with SimOptions(timeline=True)")
    if fmt == ".parquet":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        timeline.to_frame().write_parquet(path)
    else:
        write_chrome_trace(timeline, path)


def write_chrome_trace(timeline: "Timeline | None", path) -> None:
    """Write a timeline as Chrome trace-event JSON (opens in Perfetto / chrome://tracing):
    one track per resource, times in microseconds; gzipped when ``path`` ends in ``.gz``."""
    import gzip
    import json
    from pathlib import Path

    if timeline is None:
        raise ValueError("the run recorded no timeline; run with SimOptions(timeline=True)")
    tids = {"gpu": 1, "link": 2, "cpu": 3, "storage": 4}
    events = [{"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}}
              for name, tid in tids.items()]
    for resource, kind, it, req, layer, expert, start, end, nbytes in timeline.rows:
        events.append({
            "name": f"{kind} L{layer}" + (f" E{expert}" if expert >= 0 else ""),
            "cat": kind, "ph": "X", "pid": 1, "tid": tids.get(resource, 9),
            "ts": start / 1e3, "dur": (end - start) / 1e3,
            "args": {"iteration": it, "request": req, "layer": layer, "expert": expert, "bytes": nbytes},
        })
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}).encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


ITERATION_COLUMNS = ("iteration", "request", "requests", "phase", "tokens", "decode_tokens", "start_ns", "end_ns",
                     "hits", "misses", "stall_ns", "experts")
"""The per-iteration columns every engine records (request is -1 for an iteration that batches
several requests; times in ns from the run's start)."""


def columns_from_records(records: list[dict]) -> dict[str, np.ndarray]:
    """Per-iteration records (dicts with the :data:`ITERATION_COLUMNS` keys) as int64 columns."""
    return {name: np.fromiter((r[name] for r in records), dtype=np.int64, count=len(records))
            for name in ITERATION_COLUMNS}


@dataclass
class RunResult:
    """Metrics (flat dict, units in the key names), the per-iteration columns, the timeline,
    and the assumptions that explain the numbers."""

    metrics: dict
    config: dict
    assumptions: list[str]
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # ITERATION_COLUMNS, int64
    timeline: Timeline | None = None

    @property
    def iterations(self) -> list[dict]:
        """The per-iteration records as dicts (built from :attr:`columns` on first use)."""
        cached = self.__dict__.get("_iterations")
        if cached is None:
            names = [n for n in ITERATION_COLUMNS if n in self.columns]
            cached = [dict(zip(names, row)) for row in zip(*(self.columns[n].tolist() for n in names))]
            self.__dict__["_iterations"] = cached
        return cached

    def row(self) -> dict:
        """Config columns + metrics, one row for a results table."""
        return {**self.config, **self.metrics}


def _serving_line(serving: dict) -> str:
    batch, arrival = serving.get("batch", 1), serving.get("arrival", "closed")
    if batch == 1 and arrival == "closed" and not serving.get("prefill_chunk_tokens"):
        return "batch 1: each request's passes in trace order (prefill pass, then one pass per decode token)"
    how = {"closed": f"closed loop ({batch} clients: a request arrives when one ends)",
           "offline": "offline (every request queued at t=0)",
           "poisson": f"Poisson arrivals at {serving.get('rate_per_s')} requests/s",
           "timestamps": "arrivals at given timestamps"}.get(arrival, arrival)
    chunk = serving.get("prefill_chunk_tokens")
    return (f"continuous batching, up to {batch} requests per iteration, {how}"
            + (f", prefill chunks of {chunk} tokens" if chunk else "")
            + "; at each MoE layer an iteration needs the union of its tokens' experts; "
              "TPOT = per decode token, the duration of the iteration that produced it")


def _ms(ns) -> float:
    return float(ns) / 1e6


def summarise(*, model, hardware, system, cache_config, trace, columns, totals, timeline,
              memory, cost, scope, peak_cache_bytes, engine, requests=None, decode_latencies_ns=None,
              serving=None, extra=None) -> RunResult:
    """Per-run metrics from an engine's per-iteration ``columns`` (:data:`ITERATION_COLUMNS`,
    int64 arrays in iteration order).

    ``requests`` (the batcher's per-request records: arrival, first token, finish) and
    ``decode_latencies_ns`` (per decode token, the duration of the iteration that produced it)
    come from :class:`expertsim.sim.batching.ContinuousBatcher`; without them (an engine without
    serving) TTFT counts from each request's first pass and TPOT from decode-pass durations,
    which is the same at batch 1. ``extra`` (bounds) is merged into the metrics."""
    num_iterations = len(columns["start_ns"])
    rec_phase, start, end = columns["phase"], columns["start_ns"], columns["end_ns"]
    dur = end - start
    hits, misses, ntok, experts = columns["hits"], columns["misses"], columns["tokens"], columns["experts"]
    total_ns = int(end.max()) if num_iterations else 0
    decode = rec_phase == 1
    prefill = ~decode

    def rate(mask):
        h, m = int(hits[mask].sum()), int(misses[mask].sum())
        return h / (h + m) if h + m else float("nan")

    serving = serving or {"batch": 1, "arrival": "closed"}
    if requests is not None:
        # TTFT: end of the request's first pass minus its arrival; e2e: finish minus arrival.
        done = [r for r in requests if r["finish_ns"] is not None]
        ttft = [r["first_token_ns"] - r["arrival_ns"] for r in done]
        e2e = [r["finish_ns"] - r["arrival_ns"] for r in done]
        queue = [r["start_ns"] - r["arrival_ns"] for r in done]
        num_requests = len({r["request"] for r in done})
        tpot = np.asarray(decode_latencies_ns, dtype=np.int64)
    else:
        # TTFT: per request, the duration of its first iteration (batch 1: from the previous
        # request's end to the end of its first pass).
        _, first = np.unique(columns["request"], return_index=True)
        ttft, e2e, queue = dur[first].tolist(), [], []
        num_requests = len(first)
        tpot = dur[decode]
    # Decode time: the iterations that produced decode tokens (batch 1: the decode passes).
    dtok = columns["decode_tokens"]
    decode_ns = int(dur[dtok > 0].sum())
    nreq = columns["requests"]
    metrics = {
        "tokens": int(ntok.sum()),
        "prefill_tokens": int(ntok[prefill].sum()),
        "decode_tokens": int(dtok.sum()),
        "requests": num_requests,
        "iterations": num_iterations,
        "total_s": total_ns / 1e9,
        "ttft_ms": _ms(np.mean(ttft)) if ttft else float("nan"),
        "tpot_ms": _ms(tpot.mean()) if len(tpot) else float("nan"),
        "tpot_p50_ms": _ms(np.percentile(tpot, 50)) if len(tpot) else float("nan"),
        "tpot_p99_ms": _ms(np.percentile(tpot, 99)) if len(tpot) else float("nan"),
        "tokens_per_s": int(dtok.sum()) / (decode_ns / 1e9) if decode_ns else float("nan"),
        "throughput_tokens_per_s": int(dtok.sum()) / (total_ns / 1e9) if total_ns else float("nan"),
        # Output tokens (each request's prefill pass emits its first token, each decode pass one
        # more) over the busy time including prefill: the rate most papers report end to end.
        "e2e_tokens_per_s": ((int(dtok.sum()) + num_requests) / ((total_ns - totals.idle_ns) / 1e9)
                             if total_ns - totals.idle_ns > 0 else float("nan")),
        "prefill_tokens_per_s": (int(ntok[prefill].sum()) / (int(dur[prefill].sum()) / 1e9)
                                 if int(dur[prefill].sum()) > 0 else float("nan")),
        "e2e_ms": _ms(np.mean(e2e)) if e2e else float("nan"),
        "e2e_p99_ms": _ms(np.percentile(e2e, 99)) if e2e else float("nan"),
        "ttft_p99_ms": _ms(np.percentile(ttft, 99)) if ttft else float("nan"),
        "queue_ms": _ms(np.mean(queue)) if queue else float("nan"),
        "batch": int(serving.get("batch", 1)),
        "mean_batch": float(nreq.mean()) if len(nreq) else float("nan"),
        "hit_rate": rate(np.ones(num_iterations, dtype=bool)),
        "hit_rate_decode": rate(decode),
        "hit_rate_prefill": rate(prefill),
        "hits": int(hits.sum()),
        "misses": int(misses.sum()),
        "h2d_gb": totals.h2d_bytes / 1e9,
        "h2d_copies": totals.copies,
        "d2h_gb": totals.d2h_bytes / 1e9,
        "prefetch_copies": totals.prefetch_copies,
        # Of the prefetches admitted, the share a lookup used before they left (precision); of
        # the lookups that were not resident from an earlier use, the share a prefetch covered
        # (recall). None (not applicable) for runs that prefetched nothing.
        "prefetch_precision": (totals.prefetch_hits / totals.prefetch_admitted
                               if totals.prefetch_admitted else None),
        "prefetch_recall": (totals.prefetch_hits / (totals.prefetch_hits + int(misses.sum()))
                            if totals.prefetch_admitted else None),
        "stall_s": totals.stall_ns / 1e9,
        "stall_fraction": totals.stall_ns / total_ns if total_ns else 0.0,
        "dense_compute_s": totals.dense_compute_ns / 1e9,
        "expert_compute_s": totals.expert_compute_ns / 1e9,
        "cpu_compute_s": totals.cpu_ns / 1e9,
        "cpu_experts": totals.cpu_experts,
        "dropped_gate_mass": totals.dropped_gate_mass,
        "degraded_gate_mass": totals.degraded_gate_mass,
        "experts_per_layer_iteration": float(experts.sum() / (num_iterations * model.num_moe_layers)) if num_iterations else float("nan"),
        "peak_gpu_gb": (memory["dense_bytes"] + memory["kv_bytes"] + memory["workspace_bytes"] + peak_cache_bytes) / 1e9,
        "expert_cache_gb": memory["expert_cache_bytes"] / 1e9,
        "kv_peak_gb": memory["kv_bytes"] / 1e9,
        "storage_gb": totals.storage_bytes / 1e9,
        "cancelled_prefetches": totals.cancelled_prefetches,
        "idle_s": totals.idle_ns / 1e9,
        **(extra or {}),
    }
    config = {
        "model": model.name,
        "hardware": hardware.name,
        "policy": system.label,
        "cache": cache_config.describe(),
        "trace": trace.metadata.get("source", trace.metadata.get("path", "?")),
        "engine": engine,
        "scope": scope,
        "runtime": cost.runtime.name,
    }
    terms = cost.describe()
    assumptions = [
        f"{model.name} on {hardware.name}; experts {model.dtype}"
        + (f" stored in {model.expert_storage_bits:g} bits per weight" if model.expert_bits else "")
        + f", {model.expert_bytes() / 2**20:.0f} MiB each"
        + (f"; dense weights {model.dense_bits:g} bits per weight" if model.dense_bits else ""),
        f"link {hardware.link.kind} at {hardware.link.effective_bandwidth_gbps} GB/s effective + "
        f"{hardware.link.per_copy_overhead_us} us per copy: one expert copy = {terms['expert_copy_ms']:.2f} ms; "
        f"expert compute (1 token) = {terms['expert_compute_ms_1tok']:.3f} ms; dense layer (1 token) = "
        f"{terms['dense_layer_ms_1tok']:.3f} ms",
        _serving_line(serving),
        cost.runtime.describe(),
        f"expert cache: {cache_config.describe()}; starts cold; "
        + ("emptied at each request's start" if scope == "request" else "kept warm across requests"),
        ("TPOT = mean decode-pass latency; tokens_per_s = decode tokens / decode time; "
         "TTFT = first pass of each request; e2e_tokens_per_s = output tokens (decode tokens + one per "
         "request from its prefill) / total time including prefill; hit rates count resident or in-flight "
         "experts as hits")
        if serving.get("batch", 1) == 1 and serving.get("arrival", "closed") == "closed" else
        ("TPOT = mean over decode tokens of their iteration's duration; tokens_per_s = decode tokens / "
         "time of iterations with decode tokens; TTFT = arrival to the end of the request's first pass; "
         "e2e = arrival to finish; hit rates count resident or in-flight experts as hits"),
    ]
    if extra and "compute_bound_s" in extra:
        assumptions.append(
            f"bounds: compute-only {extra['compute_bound_s']:.4g} s (every expert resident), link "
            f"{extra['link_bound_s']:.4g} s ({extra['belady_misses']} copies that Belady's optimal eviction "
            f"needs, bytes over link bandwidth); simulated {total_ns / 1e9:.4g} s"
        )
        if totals.cpu_experts or totals.dropped_gate_mass or totals.degraded_gate_mass:
            assumptions.append(
                "the bounds assume every expert is computed on the GPU from a full-precision copy; this "
                "system computed experts on the CPU, skipped them or used low-precision copies, so it may "
                "run below them"
            )
    if totals.cpu_experts or totals.cpu_ns:
        assumptions.append(cost.cpu_rate_note())
    assumptions.extend(system.trace_notes(trace))
    if getattr(system, "ignores_capacity", False):
        assumptions.append(f"{system.name} ignores GPU capacity: a bound, not a feasible system")
    if getattr(system, "oracle", False) or getattr(system.eviction, "oracle", False):
        assumptions.append(f"{system.label} uses future knowledge (oracle): a bound")
    return RunResult(metrics=metrics, config=config, assumptions=assumptions, columns=columns,
                     timeline=timeline)
