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
# Colours that read right: work in blues/greys, waiting in red, CPU in purple, link in orange.
BREAKDOWN_COLORS = {"dense compute": "#9aa5b1", "expert compute": "#1f77b4", "stall on copies": "#d62728",
                    "CPU compute": "#9467bd"}
TIMELINE_COLORS = {"dense": "#9aa5b1", "expert": "#1f77b4", "cpu_expert": "#9467bd", "copy": "#ff7f0e",
                   "prefetch": "#ffbb78", "stall": "#d62728"}
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


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _unique(labels: list[str]) -> list[str]:
    """Tick labels made distinct (a category axis would stack two equal labels into one bar)."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return out


def _lines(fig, frame, x: str, y: str, *, row=None, col=None, shown: set | None = None, hover=None,
           colors: dict | None = None):
    """One line per series, sorted by x; bounds dashed; one legend entry per series over all
    panels (``shown`` collects the names already in the legend), one colour per series."""
    go = _go()
    for name in sorted(frame.get_column("series").unique().to_list()):
        part = frame.filter(frame.get_column("series") == name).sort(x)
        bound = is_bound(name)
        first = shown is None or name not in shown
        if shown is not None:
            shown.add(name)
        trace = go.Scatter(
            x=part.get_column(x).to_list(), y=part.get_column(y).to_list(), mode="lines+markers",
            name=name + (" (bound)" if bound else ""), legendgroup=name, showlegend=first,
            line={"dash": "dash" if bound else "solid", "color": (colors or {}).get(name)},
            marker={"color": (colors or {}).get(name)},
            text=part.get_column(hover).to_list() if hover and hover in part.columns else None,
        )
        if row is None:
            fig.add_trace(trace)
        else:
            fig.add_trace(trace, row=row, col=col)


def series_colors(names) -> dict:
    """One fixed colour per series (policy), the same in every panel and figure of a report."""
    import plotly.colors as pc

    names = sorted(set(names))
    palette = pc.qualitative.D3 if len(names) <= 10 else pc.qualitative.Dark24 + pc.qualitative.Light24
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def _sort_key(values: tuple) -> tuple:
    """Numbers as numbers, then text: 12 before 100."""
    return tuple((0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))
                 for v in values)


def _has_curve(frame, x: str, exclude=()) -> bool:
    """Whether some policy has two or more x values in one scenario (else there is no line to
    draw: a comparison of systems at one cache size each)."""
    import polars as pl

    keys = ["policy_label", *scenario_columns(frame, exclude, x)]
    return frame.group_by(keys).agg(pl.col(x).n_unique().alias("_n")).get_column("_n").max() > 1


def small_multiples(frame, x: str, ys: list[tuple[str, str]], *, exclude=(), hover: str | None = None,
                    max_panels: int = 12, x_title: str = "", log_x: bool = False):
    """Lines of ``ys`` against ``x``, one line per policy, one panel per combination of the
    other varying scenario columns (at most ``max_panels``), instead of one line for every
    configuration in one crowded panel. With several ``ys``, one row per panel, a column per
    metric; with one, panels wrap three to a row. Returns (figure, facet columns)."""
    import polars as pl
    from plotly.subplots import make_subplots

    facets = scenario_columns(frame, exclude, x)
    keys = sorted(frame.select(facets).unique().rows(), key=_sort_key)[:max_panels] if facets else [()]
    # Legend: the policy's short name (parameters only where two policies differ); hover: the rest.
    frame = frame.with_columns(pl.Series("series", short_labels(frame.to_dicts(), cache=False, width=60)))
    colors = series_colors(frame.get_column("series").to_list())
    names = [", ".join(str(v) if c == "label" else ("the system's own cache" if v is None and c in CACHE_COLUMNS
                                                      else f"{c}={_short(v)}") for c, v in zip(facets, key))
             for key in keys]
    if len(ys) > 1:
        rows, cols = len(keys), len(ys)
        # A row per scenario: its name over the first panel; the metrics name the y axes.
        titles = [name for name in names for _ in ys[:1]] if facets else [title for _, title in ys]
        titles = [t for name in titles for t in [name] + [""] * (len(ys) - 1)] if facets else titles
    else:
        cols = min(3, len(keys))
        rows = -(-len(keys) // cols)
        titles = names if facets else [ys[0][1]]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.08,
                        vertical_spacing=min(0.12, 0.5 / rows))
    shown: set = set()
    for i, key in enumerate(keys):
        part = frame
        for c, v in zip(facets, key):
            part = part.filter(pl.col(c).is_null() if v is None else pl.col(c) == v)
        for j, (y, _) in enumerate(ys):
            row, col = (i + 1, j + 1) if len(ys) > 1 else (i // cols + 1, i % cols + 1)
            _lines(fig, part, x, y, row=row, col=col, shown=shown, hover=hover, colors=colors)
    fig.update_xaxes(title_text=x_title, type="log" if log_x else None)
    for j, (_, title) in enumerate(ys):
        fig.update_yaxes(title_text=title, col=j + 1)
    fig.update_annotations(font_size=12)
    fig.update_layout(template=_TEMPLATE, height=max(420, 300 * rows + 140), legend_title="policy")
    if len(keys) < (frame.select(facets).unique().height if facets else 1):
        fig.add_annotation(text=f"first {len(keys)} panels shown", xref="paper", yref="paper", x=1, y=1.06,
                           showarrow=False, font={"size": 10})
    return fig, facets


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
        y=_unique(short_labels(frame.to_dicts())), x=tpot, orientation="h", text=[f"{v:.4g}" for v in tpot],
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
    if frame.get_column("cache_experts").n_unique() < 2 or not _has_curve(frame, "cache_experts", timing):
        return None
    facets = scenario_columns(frame, timing)
    frame = frame.group_by(*facets, "policy_label", "cache_experts").agg(
        pl.col("hit_rate").mean(), pl.col("cache_label").first())
    fig, _ = small_multiples(frame, "cache_experts", [("hit_rate", "hit rate")], exclude=timing,
                             hover="cache_label", x_title="expert cache size (experts resident, all layers)")
    fig.update_yaxes(range=[0, 1.02])
    fig.update_layout(title="Hit rate vs expert cache size (miss-ratio curve)")
    if not any(is_bound(s) for s in frame.get_column("policy_label").unique().to_list()):
        fig.add_annotation(text="no oracle (Belady) run in this sweep: add it to the grid for the bound",
                           xref="paper", yref="paper", x=0, y=1.0, showarrow=False, font={"size": 10})
    return fig


def tpot_throughput_vs_cache(frame):
    """TPOT and decode throughput vs expert cache size (GB), one line per policy, a row of panels
    per other scenario."""
    frame = ok_runs(frame)
    if frame.is_empty() or "expert_cache_gb" not in frame.columns:
        return None
    import polars as pl

    frame = frame.filter(~pl.col("policy").is_in(["all-on-gpu"]))
    if frame.get_column("expert_cache_gb").n_unique() < 2 or not _has_curve(frame, "expert_cache_gb", CACHE_COLUMNS):
        return None
    fig, _ = small_multiples(frame, "expert_cache_gb", [("tpot_ms", "TPOT (ms, lower is better)"),
                                                       ("tokens_per_s", "decode throughput (tokens/s)")],
                             exclude=CACHE_COLUMNS, hover="cache_label", x_title="expert cache (GB)")
    fig.update_layout(title="TPOT and throughput vs expert cache size")
    return fig


def tpot_vs_bandwidth(frame, column: str = "link.bandwidth_gbps"):
    """TPOT vs host-to-device bandwidth (log axis) with PCIe 3/4/5 and NVLink-C2C marked."""
    frame = ok_runs(frame)
    if frame.is_empty() or not _numeric(frame, column) or frame.get_column(column).n_unique() < 2:
        return None
    fig, facets = small_multiples(frame, column, [("tpot_ms", "TPOT (ms)")], exclude={column}, hover="cache_label",
                                  x_title="effective H2D bandwidth (GB/s, log)", log_x=True)
    go = _go()
    lo, hi = frame.get_column(column).min(), frame.get_column(column).max()
    y_lo, y_hi = frame.get_column("tpot_ms").min(), frame.get_column("tpot_ms").max()
    panels = {(a.xaxis, a.yaxis) for a in fig.select_traces()} if facets else {("x", "y")}
    for xaxis, yaxis in sorted(panels):
        for name, gbps in LINKS_GBPS.items():
            if lo / 1.5 <= gbps <= hi * 1.5:
                # A trace, not a shape: shapes and annotations disagree about log-axis coordinates.
                fig.add_trace(go.Scatter(x=[gbps, gbps], y=[y_lo, y_hi * 1.05], mode="lines+text",
                                         text=["", name], textposition="top center", showlegend=False,
                                         hoverinfo="skip", xaxis=xaxis, yaxis=yaxis,
                                         line={"dash": "dot", "color": "gray", "width": 1}))
    fig.update_layout(title="TPOT vs host-to-device link bandwidth")
    fig.update_yaxes(title_text="TPOT (ms)", col=1)
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
    frame = ok_runs(frame)
    if frame.is_empty() or "tokens" not in frame.columns:
        return None
    frame = frame.sort("tpot_ms").head(max_bars)
    extra = scenario_columns(frame, CACHE_COLUMNS)
    rows = frame.to_dicts()
    bars = [", ".join([label] + [f"{c}={_short(r[c])}" for c in extra if r.get(c) is not None])
            for label, r in zip(short_labels(rows), rows)]
    bars = _unique([b if len(b) <= 70 else b[:69] + "…" for b in bars])
    hover = hover_labels(frame)
    go = _go()
    fig = go.Figure()
    for column, name in BREAKDOWN:
        if column not in frame.columns:
            continue
        ms = (frame.get_column(column) * 1e3 / frame.get_column("tokens")).to_list()
        fig.add_trace(go.Bar(y=bars, x=ms, name=name, orientation="h", marker_color=BREAKDOWN_COLORS[name],
                             hovertext=hover, hoverinfo="text+x+name"))
    fig.update_layout(template=_TEMPLATE, barmode="stack", title="Latency breakdown (ms per token)",
                      xaxis_title="ms per token", height=bar_height(len(bars)),
                      yaxis={"autorange": "reversed", "automargin": True})
    return fig


def timeline_figure(timeline, title: str = "Copy/compute timeline", max_rows: int = 4000, zoom_layers: int = 4):
    """Gantt chart of a run's timeline (polars frame of Timeline.COLUMNS): one row per resource
    (GPU compute stream, H2D link, CPU), bars coloured by kind (dense, expert, stall, copy,
    prefetch, cpu_expert). It opens on the first ``zoom_layers`` MoE layers of the first recorded
    pass, where copies and compute can be told apart; the range slider shows the rest."""
    import polars as pl

    if timeline is None or timeline.is_empty():
        return None
    timeline = timeline.sort("start_ns").head(max_rows)
    t0 = timeline.get_column("start_ns").min()
    go = _go()
    fig = go.Figure()
    kinds = timeline.get_column("kind").unique().to_list()
    for kind in [k for k in TIMELINE_COLORS if k in kinds] + sorted(k for k in kinds if k not in TIMELINE_COLORS):
        part = timeline.filter(pl.col("kind") == kind)
        start = ((part.get_column("start_ns") - t0) / 1e6).to_list()
        dur = ((part.get_column("end_ns") - part.get_column("start_ns")) / 1e6).to_list()
        hover = [f"{kind} layer {l} expert {e} iter {i}" for l, e, i in
                 zip(part.get_column("layer"), part.get_column("expert"), part.get_column("iteration"))]
        fig.add_trace(go.Bar(y=part.get_column("resource").to_list(), x=dur, base=start, name=kind,
                             orientation="h", hovertext=hover, marker_color=TIMELINE_COLORS.get(kind)))
    first = timeline.filter(pl.col("iteration") == timeline.get_column("iteration").min())
    layers = sorted(v for v in first.get_column("layer").unique().to_list() if v is not None and v >= 0)
    window = first.filter(pl.col("layer").is_in(layers[:zoom_layers])) if layers else first
    end_ms = (window.get_column("end_ns").max() - t0) / 1e6
    fig.update_layout(template=_TEMPLATE, barmode="overlay", title=title, yaxis_title="resource", height=360,
                      xaxis={"title": f"time (ms); opens on the first {zoom_layers} MoE layers, drag the slider for more",
                             "range": [0, end_ms * 1.02], "rangeslider": {"visible": True, "thickness": 0.12}})
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


def published_scatter(report: dict):
    """Predicted vs published speed (tokens/s), log-log, with the y = x line and +-25% band; one
    colour per source paper, hover with the row id and ratio."""
    import math

    import plotly.graph_objects as go

    rows = [r for r in report["rows"] if r["predicted"] == r["predicted"]]  # finite
    speed = lambda r, key: r[key] if r["unit"] == "tok/s" else 1.0 / r[key]  # noqa: E731
    values = [speed(r, k) for r in rows for k in ("published", "predicted")] or [1.0]
    lo, hi = min(values) / 1.5, max(values) * 1.5
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x",
                             line=dict(color="#444", dash="dash"), hoverinfo="skip"))
    for factor, name in ((1.25, "+25%"), (0.8, "-20%")):
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo * factor, hi * factor], mode="lines", name=name,
                                 line=dict(color="#bbb", dash="dot"), hoverinfo="skip", showlegend=False))
    sources = sorted({r["source"].split(",")[0] for r in rows})
    for source in sources:
        members = [r for r in rows if r["source"].split(",")[0] == source]
        fig.add_trace(go.Scatter(
            x=[speed(r, "published") for r in members], y=[speed(r, "predicted") for r in members],
            mode="markers", name=source, marker=dict(size=10, symbol=["circle-open" if r["fit"] else "circle"
                                                                      for r in members]),
            text=[f"{r['id']}<br>{r['policy']} on {r['hardware']}<br>ratio {r['ratio']:.3f}"
                  + (" (fit)" if r["fit"] else "") for r in members],
            hovertemplate="%{text}<br>published %{x:.3g} tok/s<br>predicted %{y:.3g} tok/s<extra></extra>"))
    fig.update_layout(
        title="Predicted vs published end-to-end speed (log-log; dashed: y = x, dotted: +25% / -20%)",
        xaxis=dict(title="published speed (tokens/s)", type="log", range=[math.log10(lo), math.log10(hi)]),
        yaxis=dict(title="predicted speed (tokens/s)", type="log", range=[math.log10(lo), math.log10(hi)]),
        height=600, width=760, template="plotly_white", legend=dict(orientation="h", y=-0.18))
    return fig
