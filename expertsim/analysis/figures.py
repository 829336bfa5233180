"""Plotly figures of sweep results, timelines, validation and trace locality.

Each function takes a polars DataFrame of results (``results_frame``; runs with status "ok") or a
trace/timeline, and returns a ``plotly.graph_objects.Figure``, or ``None`` when the data lacks what
the figure needs (e.g. no swept link bandwidth for TPOT vs bandwidth). A *series* is a policy
(its label with parameters) plus whatever else varies among the runs and is not on the axes, so
no two different configurations share one line.
"""
from __future__ import annotations

import math

from expertsim.analysis.results import short_labels

# Config columns that can distinguish scenarios (besides spec overrides, which contain a dot).
SCENARIO_COLUMNS = ["label", "model", "hardware", "batch", "engine", "scope", "trace",
                    "trace_requests", "trace_phase", "trace_max_tokens", "seed",
                    "cache_per_layer", "cache_slots", "cache_gb"]
CACHE_COLUMNS = {"cache_per_layer", "cache_slots", "cache_gb"}
# Effective pinned host-to-device bandwidth of common links, GB/s (the presets' figures).
LINKS_GBPS = {"PCIe 3 x16": 12.0, "PCIe 4 x16": 24.0, "PCIe 5 x16": 50.0, "NVLink-C2C": 400.0}
BREAKDOWN = [("dense_compute_s", "dense compute"), ("expert_compute_s", "expert compute"),
             ("stall_s", "stall on copies"), ("cpu_compute_s", "CPU compute")]
_TEMPLATE = "plotly_white"


def _go():
    import plotly.graph_objects as go

    return go


def ok_runs(frame):
    import polars as pl

    if "status" not in frame.columns:
        return frame
    return frame.filter(pl.col("status") == "ok")


def is_bound(policy_label: str | None) -> bool:
    """Oracles (Belady, perfect prefetch) and capacity-ignoring systems: bounds, not systems."""
    text = (policy_label or "").lower()
    return any(word in text for word in ("belady", "oracle", "optimal", "all-on-gpu", "perfect"))


def varying(frame, exclude=()) -> list[str]:
    """Scenario columns (incl. spec overrides) that take more than one value in ``frame``."""
    cols = [c for c in SCENARIO_COLUMNS if c in frame.columns]
    cols += sorted(c for c in frame.columns if "." in c)
    return [c for c in cols if c not in exclude and frame.get_column(c).n_unique() > 1]


def determined_by(frame, column: str, candidates: list[str]) -> set[str]:
    """The candidates that take one value per value of ``column`` (a variant's overrides)."""
    import polars as pl

    if column not in frame.columns or not candidates:
        return set()
    counts = frame.group_by(column).agg(pl.col(c).n_unique() for c in candidates if c != column)
    return {c for c in candidates if c != column and counts.get_column(c).max() == 1}


def scenario_columns(frame, exclude=(), x: str | None = None) -> list[str]:
    """Varying scenario columns, less those the scenario ``label`` already names; when the
    label also fixes the x axis column, the label goes instead (its other columns stay)."""
    extra = varying(frame, exclude)
    if "label" in extra:
        fixed = determined_by(frame, "label", varying(frame))
        if x is not None and x in fixed:
            return [c for c in extra if c != "label"]
        extra = [c for c in extra if c not in fixed]
    return extra


def _series_names(frame, exclude=(), x: str | None = None) -> list[str]:
    extra = scenario_columns(frame, exclude, x)
    names = []
    for row in frame.iter_rows(named=True):
        parts = [str(row.get("policy_label") or row.get("policy"))]
        parts += [f"{c}={_short(row[c])}" for c in extra if row[c] is not None]
        names.append(", ".join(parts))
    return names


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _with_series(frame, exclude=(), x: str | None = None):
    import polars as pl

    return frame.with_columns(pl.Series("series", _series_names(frame, exclude, x)))


def _lines(fig, frame, x: str, y: str, *, row=None, col=None, showlegend=True, hover=None):
    """One line per series, sorted by x; bounds dashed."""
    go = _go()
    for name in sorted(frame.get_column("series").unique().to_list()):
        part = frame.filter(frame.get_column("series") == name).sort(x)
        bound = is_bound(name)
        trace = go.Scatter(
            x=part.get_column(x).to_list(), y=part.get_column(y).to_list(), mode="lines+markers",
            name=name + (" (bound)" if bound else ""), legendgroup=name, showlegend=showlegend,
            line={"dash": "dash" if bound else "solid"},
            text=part.get_column(hover).to_list() if hover and hover in part.columns else None,
        )
        if row is None:
            fig.add_trace(trace)
        else:
            fig.add_trace(trace, row=row, col=col)


def _numeric(frame, column: str) -> bool:
    return column in frame.columns and frame.get_column(column).dtype.is_numeric()


def hover_labels(frame) -> list[str]:
    """The full description of each row: policy with every parameter, cache, run id."""
    return [f"{r.get('policy_label')}<br>cache: {r.get('cache_label')}<br>run {r.get('run_id')}"
            for r in frame.to_dicts()]


def bar_height(rows: int, per_row_px: int = 26, chrome_px: int = 160) -> int:
    """Figure height for horizontal bars: each bar keeps its thickness however many there are."""
    return max(300, per_row_px * rows + chrome_px)


# --- results figures --------------------------------------------------------------------------
def tpot_bars(frame, max_bars: int = 60):
    """TPOT of every finished run of one scenario (a comparison), fastest first: horizontal bars
    with short labels (full parameters on hover), bounds hatched. ``None`` when the runs span
    several scenarios (the scenario, bandwidth and memory figures show those)."""
    import polars as pl

    frame = ok_runs(frame)
    if frame.is_empty() or "tpot_ms" not in frame.columns or varying(frame, exclude=CACHE_COLUMNS):
        return None
    frame = frame.sort("tpot_ms").head(max_bars)
    bound = frame.get_column("policy_label").map_elements(is_bound, return_dtype=pl.Boolean).to_list()
    tpot = frame.get_column("tpot_ms").to_list()
    go = _go()
    fig = go.Figure(go.Bar(
        y=short_labels(frame.to_dicts()), x=tpot, orientation="h", text=[f"{v:.4g}" for v in tpot],
        textposition="outside", cliponaxis=False, hovertext=hover_labels(frame), hoverinfo="text+x",
        marker={"color": "#4c78a8", "pattern": {"shape": ["/" if b else "" for b in bound]}}))
    fig.update_layout(template=_TEMPLATE, title="Decode TPOT per configuration (ms, lower is better)",
                      xaxis_title="TPOT (ms, log)", xaxis_type="log", height=bar_height(frame.height),
                      yaxis={"autorange": "reversed", "automargin": True}, showlegend=False)
    return fig


def scenario_bars(frame, column: str = "label", order: list | None = None):
    """Best feasible TPOT (bounds excluded) per scenario (``label``), one panel per combination
    of the other varying columns that the scenario does not determine (e.g. expert dtype)."""
    import polars as pl
    from plotly.subplots import make_subplots

    frame = ok_runs(frame)
    if frame.is_empty() or column not in frame.columns or frame.get_column(column).n_unique() < 2:
        return None
    frame = frame.filter(~pl.col("policy_label").map_elements(is_bound, return_dtype=pl.Boolean))
    present = list(dict.fromkeys(frame.get_column(column).to_list()))
    order = [x for x in (order or []) if x in present] + [x for x in present if x not in (order or [])]
    # Columns a scenario fixes (its overrides) are not panels.
    panels = [c for c in varying(frame, exclude={column} | CACHE_COLUMNS)
              if frame.group_by(column).agg(pl.col(c).n_unique()).get_column(c).max() > 1]
    best = (frame.sort("tpot_ms", "policy_label").group_by([column, *panels], maintain_order=True)
            .agg(pl.col("tpot_ms").first(), pl.col("policy_label").first(), pl.col("cache_label").first()))
    keys = sorted(best.select(panels).unique().rows(), key=str) if panels else [()]
    titles = [", ".join(f"{c}={_short(v)}" for c, v in zip(panels, key)) or "best TPOT" for key in keys]
    fig = make_subplots(rows=1, cols=len(keys), subplot_titles=titles)
    go = _go()
    for i, key in enumerate(keys, start=1):
        part = best
        for c, v in zip(panels, key):
            part = part.filter(pl.col(c) == v)
        rows = {r[column]: r for r in part.iter_rows(named=True)}
        xs = [x for x in order if x in rows]
        ys = [rows[x]["tpot_ms"] for x in xs]
        fig.add_trace(go.Bar(x=xs, y=ys, text=[f"{y:.1f} ms" for y in ys], textposition="outside",
                             hovertext=[f"{rows[x]['policy_label']}, {rows[x]['cache_label']}" for x in xs],
                             showlegend=False, marker_color="#4c78a8"), row=1, col=i)
        fig.update_yaxes(range=[0, max(ys) * 1.18] if ys else None, row=1, col=i)
    fig.update_yaxes(title_text="best TPOT (ms)", row=1, col=1)
    fig.update_layout(template=_TEMPLATE, title="Best TPOT per scenario (lower is better)", height=450)
    return fig


def miss_ratio_curve(frame):
    """Hit rate vs cache size (experts resident), one line per policy, bounds dashed. Timing-only
    columns (hardware, link, GPU, CPU) do not change hits, so runs that differ only in them are
    one point."""
    import polars as pl

    frame = ok_runs(frame)
    if frame.is_empty() or "cache_experts" not in frame.columns:
        return None
    timing = {c for c in frame.columns if c.startswith(("link.", "gpu.", "cpu.", "storage."))} | {"hardware"}
    timing |= CACHE_COLUMNS
    frame = frame.filter(~pl.col("policy").is_in(["all-on-gpu"]))
    if frame.get_column("cache_experts").n_unique() < 2:
        return None
    frame = _with_series(frame, exclude=timing)
    frame = frame.group_by("series", "cache_experts").agg(pl.col("hit_rate").mean(),
                                                          pl.col("cache_label").first())
    go = _go()
    fig = go.Figure()
    _lines(fig, frame, "cache_experts", "hit_rate", hover="cache_label")
    fig.update_layout(template=_TEMPLATE, title="Hit rate vs expert cache size (miss-ratio curve)",
                      xaxis_title="expert cache size (experts resident, all layers)",
                      yaxis_title="hit rate", yaxis_range=[0, 1.02], legend_title="policy")
    if not any(is_bound(s) for s in frame.get_column("series").unique().to_list()):
        fig.add_annotation(text="no oracle (Belady) run in this sweep: add it to the grid for the bound",
                           xref="paper", yref="paper", x=0, y=1.0, showarrow=False, font={"size": 10})
    return fig


def tpot_throughput_vs_cache(frame):
    """TPOT and decode throughput vs expert cache size (GB), one line per series."""
    from plotly.subplots import make_subplots

    frame = ok_runs(frame)
    if frame.is_empty() or "expert_cache_gb" not in frame.columns:
        return None
    import polars as pl

    frame = frame.filter(~pl.col("policy").is_in(["all-on-gpu"]))
    if frame.get_column("expert_cache_gb").n_unique() < 2:
        return None
    frame = _with_series(frame, exclude=CACHE_COLUMNS)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("TPOT (ms, lower is better)",
                                                        "decode throughput (tokens/s)"))
    _lines(fig, frame, "expert_cache_gb", "tpot_ms", row=1, col=1, hover="cache_label")
    _lines(fig, frame, "expert_cache_gb", "tokens_per_s", row=1, col=2, showlegend=False, hover="cache_label")
    fig.update_xaxes(title_text="expert cache (GB)")
    fig.update_layout(template=_TEMPLATE, title="TPOT and throughput vs expert cache size")
    return fig


def tpot_vs_bandwidth(frame, column: str = "link.bandwidth_gbps"):
    """TPOT vs host-to-device bandwidth (log axis) with PCIe 3/4/5 and NVLink-C2C marked."""
    frame = ok_runs(frame)
    if frame.is_empty() or not _numeric(frame, column) or frame.get_column(column).n_unique() < 2:
        return None
    frame = _with_series(frame, exclude={column}, x=column)
    go = _go()
    fig = go.Figure()
    _lines(fig, frame, column, "tpot_ms", hover="cache_label")
    lo, hi = frame.get_column(column).min(), frame.get_column(column).max()
    y_lo, y_hi = frame.get_column("tpot_ms").min(), frame.get_column("tpot_ms").max()
    for name, gbps in LINKS_GBPS.items():
        if lo / 1.5 <= gbps <= hi * 1.5:
            # A trace, not a shape: shapes and annotations disagree about log-axis coordinates.
            fig.add_trace(go.Scatter(x=[gbps, gbps], y=[y_lo, y_hi * 1.05], mode="lines+text",
                                     text=["", name], textposition="top center", showlegend=False,
                                     hoverinfo="skip", line={"dash": "dot", "color": "gray", "width": 1}))
    fig.update_layout(template=_TEMPLATE, title="TPOT vs host-to-device link bandwidth",
                      xaxis_title="effective H2D bandwidth (GB/s, log)", yaxis_title="TPOT (ms)",
                      xaxis_type="log", legend_title="series")
    return fig


def memory_bandwidth_heatmap(frame, x: str = "link.bandwidth_gbps", y: str = "gpu.memory_gb"):
    """Best feasible TPOT (ms) over the non-bound policies, per GPU memory x link bandwidth cell."""
    import polars as pl

    frame = ok_runs(frame)
    if frame.is_empty() or not (_numeric(frame, x) and _numeric(frame, y)):
        return None
    frame = frame.drop_nulls([x, y])  # a run that did not override a field has no value to place
    if frame.get_column(x).n_unique() < 2 or frame.get_column(y).n_unique() < 2:
        return None
    from plotly.subplots import make_subplots

    frame = frame.filter(~pl.col("policy_label").map_elements(is_bound, return_dtype=pl.Boolean))
    # Other varying columns (e.g. expert dtype) get their own panel, at most four.
    panels = [c for c in varying(frame, exclude={x, y, "label"} | CACHE_COLUMNS)
              if c not in determined_by(frame, x, varying(frame)) | determined_by(frame, y, varying(frame))]
    keys = sorted(frame.select(panels).unique().rows(), key=str)[:4] if panels else [()]
    xs = sorted(frame.get_column(x).unique().to_list())
    ys = sorted(frame.get_column(y).unique().to_list())
    titles = [", ".join(f"{c}={_short(v)}" for c, v in zip(panels, key)) for key in keys]
    fig = make_subplots(rows=1, cols=len(keys), subplot_titles=titles if panels else None,
                        horizontal_spacing=0.12)
    go = _go()
    for i, key in enumerate(keys, start=1):
        part = frame
        for c, v in zip(panels, key):
            part = part.filter(pl.col(c) == v)
        cells = part.group_by(x, y).agg(pl.col("tpot_ms").min().alias("tpot_ms"))
        lookup = {(r[x], r[y]): r["tpot_ms"] for r in cells.iter_rows(named=True)}
        z = [[lookup.get((a, b)) for a in xs] for b in ys]
        text = [[("" if v is None else f"{v:.4g}") for v in row] for row in z]
        fig.add_trace(go.Heatmap(x=[_short(v) for v in xs], y=[_short(v) for v in ys], z=z, text=text,
                                 texttemplate="%{text}", colorscale="Viridis_r", showscale=False),
                      row=1, col=i)
        fig.update_xaxes(title_text="H2D bandwidth (GB/s)", type="category", row=1, col=i)
        fig.update_yaxes(title_text="GPU memory (GB)" if i == 1 else None, type="category", row=1, col=i)
    fig.update_layout(template=_TEMPLATE, title="Best TPOT (ms): GPU memory x link bandwidth")
    return fig


def latency_breakdown(frame, max_bars: int = 40):
    """Where each run's time goes, ms per token: dense compute, expert compute, stall on copies,
    CPU compute (stacked; CPU experts overlap the GPU, so a bar can exceed the wall time)."""
    import polars as pl

    frame = ok_runs(frame)
    if frame.is_empty() or "tokens" not in frame.columns:
        return None
    frame = _with_series(frame, exclude=CACHE_COLUMNS).with_columns(
        pl.concat_str([pl.col("series"), pl.col("cache_label").fill_null("")], separator=" | ").alias("bar"))
    frame = frame.sort("tpot_ms").head(max_bars)
    go = _go()
    fig = go.Figure()
    bars = frame.get_column("bar").to_list()
    for column, name in BREAKDOWN:
        if column not in frame.columns:
            continue
        ms = (frame.get_column(column) * 1e3 / frame.get_column("tokens")).to_list()
        fig.add_trace(go.Bar(y=bars, x=ms, name=name, orientation="h"))
    fig.update_layout(template=_TEMPLATE, barmode="stack", title="Latency breakdown (ms per token)",
                      xaxis_title="ms per token", height=max(350, 22 * len(bars) + 150),
                      yaxis={"autorange": "reversed"}, margin={"l": 380})
    return fig


def timeline_figure(timeline, title: str = "Copy/compute timeline", max_rows: int = 4000):
    """Gantt chart of a run's timeline (polars frame of Timeline.COLUMNS): one row per resource
    (GPU compute stream, H2D link, CPU), bars coloured by kind (dense, expert, stall, copy,
    prefetch, cpu_expert)."""
    if timeline is None or timeline.is_empty():
        return None
    timeline = timeline.sort("start_ns").head(max_rows)
    t0 = timeline.get_column("start_ns").min()
    go = _go()
    fig = go.Figure()
    for kind in sorted(timeline.get_column("kind").unique().to_list()):
        part = timeline.filter(timeline.get_column("kind") == kind)
        start = ((part.get_column("start_ns") - t0) / 1e6).to_list()
        dur = ((part.get_column("end_ns") - part.get_column("start_ns")) / 1e6).to_list()
        hover = [f"{kind} layer {l} expert {e} iter {i}" for l, e, i in
                 zip(part.get_column("layer"), part.get_column("expert"), part.get_column("iteration"))]
        fig.add_trace(go.Bar(y=part.get_column("resource").to_list(), x=dur, base=start, name=kind,
                             orientation="h", hovertext=hover))
    fig.update_layout(template=_TEMPLATE, barmode="overlay", title=title, xaxis_title="time (ms)",
                      yaxis_title="resource", height=320)
    return fig


def predicted_vs_measured(frame, metric: str = "tpot_ms"):
    """Simulator prediction vs real-runner measurement, with the y = x line. ``frame`` has
    ``predicted_<metric>`` and ``measured_<metric>`` (and optionally ``label`` or ``policy``), as
    ``expertsim validate`` writes to its ``validation.parquet``."""
    p, m = f"predicted_{metric}", f"measured_{metric}"
    if frame is None or p not in frame.columns or m not in frame.columns or frame.is_empty():
        return None
    go = _go()
    xs, ys = frame.get_column(m).to_list(), frame.get_column(p).to_list()
    label = next((c for c in ("label", "policy") if c in frame.columns), None)
    labels = [str(v) for v in frame.get_column(label).to_list()] if label else None
    hi = max(v for v in xs + ys if v is not None and not math.isnan(v)) * 1.05
    fig = go.Figure([
        go.Scatter(x=xs, y=ys, mode="markers", name="runs", text=labels),
        go.Scatter(x=[0, hi], y=[0, hi], mode="lines", name="y = x", line={"dash": "dash", "color": "gray"}),
    ])
    err = [abs(a - b) / b for a, b in zip(ys, xs) if a is not None and b]
    mape = sum(err) / len(err) if err else float("nan")
    fig.update_layout(template=_TEMPLATE, title=f"Predicted vs measured {metric} (mean abs. error {mape:.1%})",
                      xaxis_title=f"measured {metric}", yaxis_title=f"predicted {metric}")
    return fig


# --- trace locality ----------------------------------------------------------------------------
def popularity_figure(trace, title: str = "Expert popularity per layer"):
    """Share of lookups per expert at each MoE layer (heatmap, rows sum to 1)."""
    from expertsim.traces.stats import popularity

    pop = popularity(trace, phase="all")
    go = _go()
    fig = go.Figure(go.Heatmap(z=pop.tolist(), x=list(range(pop.shape[1])), y=list(range(pop.shape[0])),
                               colorscale="Blues", colorbar={"title": "share"}))
    fig.update_layout(template=_TEMPLATE, title=title, xaxis_title="expert", yaxis_title="MoE layer",
                      height=420)
    return fig


def reuse_distance_figure(trace, title: str = "Reuse (stack) distance"):
    """Share of lookups at each per-layer stack distance, plus first uses ("cold"): an LRU cache
    of K slots per layer hits every lookup with distance < K."""
    from expertsim.traces.stats import reuse_distance_histogram

    hist = reuse_distance_histogram(trace, phase="all")
    go = _go()
    xs = [str(d) for d in hist["distance"]] + ["cold"]
    ys = list(hist["share"]) + [hist["cold"]]
    fig = go.Figure(go.Bar(x=xs, y=ys))
    fig.update_layout(template=_TEMPLATE, title=title, xaxis_title="stack distance (distinct experts since last use)",
                      yaxis_title="share of lookups", xaxis_type="category")
    return fig
