"""Run metrics and the per-run timeline."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class Timeline:
    """Every copy, compute and stall of a run as rows
    (resource, kind, iteration, request, layer, expert, start_ns, end_ns, bytes)."""

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


def write_chrome_trace(timeline: "Timeline | None", path) -> None:
    """Write a timeline as Chrome trace-event JSON (opens in Perfetto / chrome://tracing):
    one track per resource, times in microseconds."""
    import json
    from pathlib import Path

    if timeline is None:
        raise ValueError("the run recorded no timeline; run with SimOptions(timeline=True)")
    tids = {"gpu": 1, "link": 2, "cpu": 3}
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
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))


@dataclass
class RunResult:
    """Metrics (flat dict, units in the key names), the per-iteration records, the timeline,
    and the assumptions that explain the numbers."""

    metrics: dict
    config: dict
    assumptions: list[str]
    iterations: list[dict] = field(default_factory=list)
    timeline: Timeline | None = None

    def row(self) -> dict:
        """Config columns + metrics, one row for a results table."""
        return {**self.config, **self.metrics}


def _ms(ns) -> float:
    return float(ns) / 1e6


def summarise(*, model, hardware, system, cache_config, trace, iterations, records, totals, timeline,
              memory, cost, scope, peak_cache_bytes, engine) -> RunResult:
    """Per-run metrics from the per-iteration records of an engine."""
    rec_phase = np.array([r["phase"] for r in records], dtype=np.int64)
    start = np.array([r["start_ns"] for r in records], dtype=np.int64)
    end = np.array([r["end_ns"] for r in records], dtype=np.int64)
    dur = end - start
    hits = np.array([r["hits"] for r in records], dtype=np.int64)
    misses = np.array([r["misses"] for r in records], dtype=np.int64)
    ntok = np.array([r["tokens"] for r in records], dtype=np.int64)
    experts = np.array([r["experts"] for r in records], dtype=np.int64)
    total_ns = int(end.max()) if len(end) else 0
    decode = rec_phase == 1
    prefill = ~decode

    def rate(mask):
        h, m = int(hits[mask].sum()), int(misses[mask].sum())
        return h / (h + m) if h + m else float("nan")

    # TTFT: per request, end of its first pass minus its start (batch 1: the previous request's end).
    ttft = []
    seen = set()
    req_start = {}
    for r in records:
        req_start.setdefault(r["request"], r["start_ns"])
        if r["request"] not in seen:
            seen.add(r["request"])
            ttft.append(r["end_ns"] - req_start[r["request"]])
    tpot = dur[decode]
    decode_ns = int(tpot.sum())
    metrics = {
        "tokens": int(ntok.sum()),
        "prefill_tokens": int(ntok[prefill].sum()),
        "decode_tokens": int(ntok[decode].sum()),
        "requests": len(seen),
        "iterations": len(records),
        "total_s": total_ns / 1e9,
        "ttft_ms": _ms(np.mean(ttft)) if ttft else float("nan"),
        "tpot_ms": _ms(tpot.mean()) if len(tpot) else float("nan"),
        "tpot_p50_ms": _ms(np.percentile(tpot, 50)) if len(tpot) else float("nan"),
        "tpot_p99_ms": _ms(np.percentile(tpot, 99)) if len(tpot) else float("nan"),
        "tokens_per_s": int(ntok[decode].sum()) / (decode_ns / 1e9) if decode_ns else float("nan"),
        "hit_rate": rate(np.ones(len(records), dtype=bool)),
        "hit_rate_decode": rate(decode),
        "hit_rate_prefill": rate(prefill),
        "hits": int(hits.sum()),
        "misses": int(misses.sum()),
        "h2d_gb": totals["h2d_bytes"] / 1e9,
        "h2d_copies": totals["copies"],
        "prefetch_copies": totals["prefetch_copies"],
        "stall_s": totals["stall_ns"] / 1e9,
        "stall_fraction": totals["stall_ns"] / total_ns if total_ns else 0.0,
        "dense_compute_s": totals["dense_compute_ns"] / 1e9,
        "expert_compute_s": totals["expert_compute_ns"] / 1e9,
        "cpu_compute_s": totals["cpu_ns"] / 1e9,
        "cpu_experts": totals["cpu_experts"],
        "dropped_gate_mass": totals["dropped_gate_mass"],
        "degraded_gate_mass": totals["degraded_gate_mass"],
        "experts_per_layer_iteration": float(experts.sum() / (len(records) * model.num_moe_layers)) if len(records) else float("nan"),
        "peak_gpu_gb": (memory["dense_bytes"] + memory["kv_bytes"] + memory["workspace_bytes"] + peak_cache_bytes) / 1e9,
        "expert_cache_gb": memory["expert_cache_bytes"] / 1e9,
    }
    config = {
        "model": model.name,
        "hardware": hardware.name,
        "policy": system.label,
        "cache": cache_config.describe(),
        "trace": trace.metadata.get("source", trace.metadata.get("path", "?")),
        "engine": engine,
        "scope": scope,
    }
    terms = cost.describe()
    assumptions = [
        f"{model.name} on {hardware.name}; experts {model.dtype}, {model.expert_bytes() / 2**20:.0f} MiB each",
        f"link {hardware.link.kind} at {hardware.link.effective_bandwidth_gbps} GB/s effective + "
        f"{hardware.link.per_copy_overhead_us} us per copy: one expert copy = {terms['expert_copy_ms']:.2f} ms; "
        f"expert compute (1 token) = {terms['expert_compute_ms_1tok']:.3f} ms; dense layer (1 token) = "
        f"{terms['dense_layer_ms_1tok']:.3f} ms",
        f"batch 1: each request's passes in trace order (prefill pass, then one pass per decode token)",
        f"expert cache: {cache_config.describe()}; starts cold; "
        + ("emptied at each request's start" if scope == "request" else "kept warm across requests"),
        "TPOT = mean decode-pass latency; tokens_per_s = decode tokens / decode time; "
        "TTFT = first pass of each request; hit rates count resident or in-flight experts as hits",
    ]
    if getattr(system, "ignores_capacity", False):
        assumptions.append(f"{system.name} ignores GPU capacity: a bound, not a feasible system")
    if getattr(system, "oracle", False) or getattr(system.eviction, "oracle", False):
        assumptions.append(f"{system.label} uses future knowledge (oracle): a bound")
    return RunResult(metrics=metrics, config=config, assumptions=assumptions, iterations=records,
                     timeline=timeline)
