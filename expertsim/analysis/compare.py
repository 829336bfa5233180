"""`expertsim compare`: several policies on one model, hardware and trace; a table and a report.

The default study (no arguments) is Mixtral-8x7B on an A40 over the built-in synthetic trace
(sampled from the Mixtral fit shipped in expertsim/data), comparing no cache, LRU with 2 and 3
slots per layer (4 bf16 Mixtral experts per layer would not fit in 48 GB beside the dense
weights) and all-on-GPU (a bound that ignores capacity).
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from expertsim.errors import ConfigError

DEFAULT_MODEL = "mixtral-8x7b"
DEFAULT_HARDWARE = "a40"
DEFAULT_POLICIES = ["no-cache", "lru:2", "lru:3", "all-on-gpu"]
TABLE_COLUMNS = [
    ("policy", "policy"), ("cache", "cache"), ("hit_rate", "hit_rate"), ("tpot_ms", "TPOT_ms"),
    ("tokens_per_s", "tokens_per_s"), ("h2d_gb", "GB_over_link"), ("stall_fraction", "stall_share"),
]


@dataclass
class CompareReport:
    rows: list[dict]
    assumptions: list[str]
    html_path: Path
    parquet_path: Path
    extra_columns: list[tuple[str, str]] = field(default_factory=list)

    def table_rows(self) -> list[dict]:
        cols = TABLE_COLUMNS + self.extra_columns
        return [{label: row.get(key) for key, label in cols} for row in self.rows]


def _parse_policy(spec: str) -> tuple[str, int | None]:
    name, _, k = spec.partition(":")
    if not k:
        return name, None
    try:
        return name, int(k)
    except ValueError:
        raise ConfigError(f"--policy {spec!r}: expected NAME or NAME:K with K slots per layer") from None


def _entries(policies, systems, model, hardware, max_context_tokens):
    from expertsim.policies import CacheConfig, make_policy, make_system, system_names

    entries = []
    if systems:
        names = system_names() if systems == "all" else [s.strip() for s in systems.split(",") if s.strip()]
        for name in names:
            system = make_system(name)
            entries.append((system, _system_cache(system, model, hardware, max_context_tokens)))
    for spec in policies or ([] if systems else DEFAULT_POLICIES):
        name, k = _parse_policy(spec)
        system = make_policy(name)
        config = CacheConfig(per_layer=k) if k is not None else _system_cache(system, model, hardware, max_context_tokens)
        entries.append((system, config))
    return entries


def _system_cache(system, model, hardware, max_context_tokens):
    """A system's own cache size: fixed by the system, or its default for the hardware."""
    fixed = system.cache_config(model)
    if fixed is not None:
        return fixed
    default = getattr(system, "default_cache_config", None)
    if default is not None:
        config = default(model, hardware, max_context_tokens)
        if config is not None:
            return config
    raise ConfigError(f"policy {system.label!r} needs a cache size: write it as {system.name}:K")


def _decode_window(trace, n: int = 3) -> tuple[int, int]:
    from expertsim.sim.workload import iterations_batch1

    its = iterations_batch1(trace)
    first = next((it.index for it in its if it.phase == 1), 0)
    return first, first + n


def run_compare(*, model=None, hardware=None, trace_path=None, policies=None, systems=None,
                max_tokens=None, out="expertsim-out", progress: Callable[[str], None] | None = None,
                engine_options=None) -> CompareReport:
    import polars as pl

    from expertsim.sim import SimOptions, Simulation
    from expertsim.specs import load_hardware, load_model
    from expertsim.traces import read_trace
    from expertsim.traces.synth import default_trace

    m = load_model(model or DEFAULT_MODEL)
    h = load_hardware(hardware or DEFAULT_HARDWARE)
    trace = read_trace(trace_path) if trace_path else default_trace()
    if max_tokens:
        trace = trace.max_tokens(max_tokens)
    window = _decode_window(trace)
    results = []
    entries = _entries(policies, systems, m, h, int(trace.position.max()) + 1)
    for i, (system, cache_config) in enumerate(entries):
        if progress:
            progress(f"[{i + 1}/{len(entries)}] simulating {system.label} ({cache_config.describe()}) "
                     f"on {trace.num_tokens} tokens ...")
        options = SimOptions(timeline=True, timeline_iterations=window)
        result = Simulation(m, h, system, cache_config, options=options).run(trace)
        results.append(result)
    rows = [r.row() for r in results]
    assumptions = results[0].assumptions[:1] + results[0].assumptions[1:]
    # Per-run lines (cache size, bounds) are added below, labelled with their policy.
    assumptions = [a for a in assumptions if not a.startswith(("expert cache:", "bounds:"))]
    assumptions.append("expert cache per row (column 'cache'); starts cold, kept warm across requests")
    assumptions.append(f"trace: {trace.metadata.get('source', trace_path)} ({trace.num_tokens} tokens, "
                       f"{trace.num_requests} requests)")
    for r in results:
        for a in r.assumptions:
            if a.startswith("bounds:"):
                assumptions.append(f"{r.config['policy']} [{r.config['cache']}] {a}")
            elif "bound" in a and a not in assumptions:
                assumptions.append(a)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    parquet_path = outdir / "results.parquet"
    pl.DataFrame(rows).write_parquet(parquet_path)
    html_path = outdir / "report.html"
    html_path.write_text(_report_html(rows, results, assumptions, m, h, trace))
    extra = []
    if systems:
        extra = [("prefetch_precision", "prefetch_precision"), ("prefetch_recall", "prefetch_recall"),
                 ("dropped_gate_mass", "gate_mass_dropped")]
    return CompareReport(rows=rows, assumptions=assumptions, html_path=html_path,
                         parquet_path=parquet_path, extra_columns=extra)


def _label(row: dict) -> str:
    return f"{row['policy']} [{row['cache']}]"


def _report_html(rows, results, assumptions, model, hardware, trace) -> str:
    import plotly.graph_objects as go
    import plotly.io as pio

    from expertsim import __version__

    labels = [_label(r) for r in rows]
    tpot = go.Figure(go.Bar(x=labels, y=[r["tpot_ms"] for r in rows],
                            text=[f"{r['tpot_ms']:.1f}" for r in rows], textposition="auto"))
    tpot.update_layout(title="Decode TPOT per policy (ms per token, batch 1)", yaxis_title="TPOT (ms)",
                       yaxis_type="log", height=420)
    breakdown = go.Figure()
    for key, name in (("dense_compute_s", "dense compute"), ("expert_compute_s", "expert compute"),
                      ("stall_s", "stall on copies")):
        breakdown.add_bar(x=labels, y=[r[key] for r in rows], name=name)
    breakdown.update_layout(barmode="stack", title="Where the time goes (s, whole trace)",
                            yaxis_title="seconds", height=420)
    figures = [tpot, breakdown]
    # Timeline of a few decode tokens for the first policy that copies anything.
    pick = next((i for i, r in enumerate(rows) if r["h2d_gb"] > 0 and r["hit_rate"] > 0), 0)
    tl = results[pick].timeline
    if tl is not None and len(tl):
        figures.append(timeline_figure(tl, f"Copy/compute timeline, first decode tokens: {labels[pick]}"))
    parts = []
    for i, fig in enumerate(figures):
        parts.append(pio.to_html(fig, include_plotlyjs=(i == 0), full_html=False,
                                 config={"displaylogo": False}))
    head = [("policy", "policy"), ("cache", "cache"), ("hit_rate", "hit rate"), ("tpot_ms", "TPOT (ms)"),
            ("tokens_per_s", "tokens/s"), ("h2d_gb", "GB over link"), ("stall_fraction", "stall share"),
            ("ttft_ms", "TTFT (ms)")]
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for _, h in head) + "</tr>"
    for r in rows:
        cells = []
        for key, _ in head:
            v = r.get(key)
            cells.append(f"<td>{v:.4g}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>")
        table += "<tr>" + "".join(cells) + "</tr>"
    table += "</table>"
    notes = "".join(f"<li>{html.escape(a)}</li>" for a in assumptions)
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>expertsim compare: {html.escape(model.name)} on {html.escape(hardware.name)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
th{{background:#f3f3f3}}</style></head><body>
<h1>{html.escape(model.name)} on {html.escape(hardware.name)}</h1>
<p>expertsim {__version__}; trace: {html.escape(str(trace.metadata.get('source', '?')))}</p>
{table}<h2>Assumptions</h2><ul>{notes}</ul>
{''.join(f'<div class="figure">{p}</div>' for p in parts)}
</body></html>"""


def timeline_figure(timeline, title: str):
    """A plotly Gantt of a Timeline: one row per resource, bars per copy/compute/stall."""
    import plotly.graph_objects as go

    data = timeline.to_dict()
    start = np.array(data["start_ns"], dtype=np.int64)
    end = np.array(data["end_ns"], dtype=np.int64)
    t0 = start.min() if len(start) else 0
    colors = {"dense": "#7f7f7f", "expert": "#1f77b4", "copy": "#d62728", "prefetch": "#ff7f0e",
              "stall": "#e7e7e7", "cpu_expert": "#2ca02c"}
    fig = go.Figure()
    kinds = np.array(data["kind"])
    resources = np.array(data["resource"])
    for kind in dict.fromkeys(data["kind"]):
        mask = kinds == kind
        fig.add_bar(
            base=(start[mask] - t0) / 1e6, x=(end[mask] - start[mask]) / 1e6, y=resources[mask],
            orientation="h", name=kind, marker_color=colors.get(kind),
            hovertext=[f"{kind} layer {l} expert {e}" for l, e in
                       zip(np.array(data["layer"])[mask], np.array(data["expert"])[mask])],
        )
    fig.update_layout(barmode="overlay", title=title, xaxis_title="time (ms)", height=320)
    return fig
