"""One self-contained HTML report of a sweep directory (works offline: plotly.js inlined once).

Sections: the summary (best policy per scenario and its gain over the baseline), the figures
(miss-ratio curve, TPOT/throughput vs cache, TPOT vs bandwidth, memory x bandwidth heatmap,
latency breakdown, copy/compute timelines, predicted vs measured when ``DIR/validation.parquet``
or ``.csv`` exists, trace locality), failed runs, and the configuration and provenance
(expertsim version, trace file hashes, spec values, the study file).

``DIR/validation.parquet`` (or ``.csv``, or ``--validation PATH``) holds ``predicted_tpot_ms`` and
``measured_tpot_ms`` columns, one row a validated configuration (optional ``label`` or ``policy``):
the ``validation.parquet`` that ``expertsim validate --out DIR`` writes.
"""
from __future__ import annotations

import datetime as _dt
import html
import json
from pathlib import Path

from expertsim.analysis import figures as F
from expertsim.console import format_value

REPORT_FILE = "report.html"

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.figure { margin: 1.5em 0; } .caption { color: #555; font-size: 0.9em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
.note { color: #555; }
"""


def _esc(value) -> str:
    return html.escape("" if value is None else str(value))


_fmt = format_value


def html_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "<p class='note'>(none)</p>"
    columns = columns or list(rows[0])
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c)
            cls = " class='num'" if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{_esc(_fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# --- summary ----------------------------------------------------------------------------------
def summary_rows(frame, baseline: str | None, order: list | None = None) -> list[dict]:
    """Per scenario (the varying config columns other than policy and cache size): the best
    non-bound configuration by TPOT, the baseline policy's TPOT there, and the speed-up."""
    import polars as pl

    frame = F.ok_runs(frame)
    if frame.is_empty():
        return []
    cache_cols = {"cache_per_layer", "cache_slots", "cache_gb"}
    scen = F.varying(frame, exclude=cache_cols)
    frame = frame.with_columns(
        pl.col("policy_label").map_elements(F.is_bound, return_dtype=pl.Boolean).alias("_bound"))
    rows = []
    groups = frame.group_by(scen, maintain_order=True) if scen else [((), frame)]
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        feasible = part.filter(~pl.col("_bound")).sort("tpot_ms", "policy_label", "cache_label",
                                                         nulls_last=True)
        if feasible.is_empty():
            continue
        best = feasible.row(0, named=True)
        # Policies that tie with the best (e.g. every policy at k slots per layer for top-k).
        tied = feasible.filter((pl.col("tpot_ms") - best["tpot_ms"]).abs() <= 1e-9 * abs(best["tpot_ms"]))
        row = {c: v for c, v in zip(scen, key)}
        row.update({"best policy": " = ".join(dict.fromkeys(tied.get_column("policy_label").to_list())),
                    "cache": best.get("cache_label"),
                    "TPOT ms": best["tpot_ms"], "tokens/s": best.get("tokens_per_s"),
                    "hit rate": best.get("hit_rate")})
        base = part.filter(pl.col("policy") == baseline) if baseline else part.head(0)
        if not base.is_empty():
            same = base.filter(pl.col("cache_label") == best.get("cache_label"))
            b = (same if not same.is_empty() else base.sort("tpot_ms")).row(0, named=True)
            row[f"baseline ({baseline}) TPOT ms"] = b["tpot_ms"]
            row["speed-up vs baseline"] = b["tpot_ms"] / best["tpot_ms"] if best["tpot_ms"] else None
        else:
            row[f"baseline ({baseline}) TPOT ms"] = None
            row["speed-up vs baseline"] = None
        bounds = part.filter(pl.col("_bound")).sort("tpot_ms")
        row["bound TPOT ms"] = bounds.row(0, named=True)["tpot_ms"] if not bounds.is_empty() else None
        rows.append(row)
    # Order: the columns a scenario label does not fix (e.g. dtype), then the labels as the study lists them.
    rank = {label: i for i, label in enumerate(order or [])}
    fixed = F.determined_by(frame, "label", scen) if "label" in scen else set()
    keys = [c for c in scen if c not in fixed and c != "label"] + (["label"] if "label" in scen else [])
    def key(row):  # study order for labels, numbers as numbers (12 before 100), then text
        return tuple((0, rank[row[c]], "") if c == "label" and row[c] in rank else
                     (1, row[c], "") if isinstance(row[c], (int, float)) and not isinstance(row[c], bool) else
                     (2, 0, str(row[c])) for c in keys)

    rows.sort(key=key)
    return rows


# --- figures ----------------------------------------------------------------------------------
def collect_figures(out_dir: Path, frame, plan: dict, validation: Path | None = None) -> list[tuple[str, object, str]]:
    """(title, figure, caption) for every figure the data supports."""
    import polars as pl

    figs: list[tuple[str, object, str]] = []

    def add(title, fig, caption):
        if fig is not None:
            figs.append((title, fig, caption))

    if "tpot_ms" not in frame.columns:  # no run finished: nothing to plot but the traces
        frame = frame.head(0).with_columns(pl.lit(None, dtype=pl.Float64).alias("tpot_ms"))

    labels = [c.get("label") for c in plan.get("runs", []) if c.get("label") is not None]
    add("Scenarios", F.scenario_bars(frame, order=list(dict.fromkeys(labels))),
        "Lowest TPOT over the feasible policies and cache layouts of each scenario (hover: which).")
    add("TPOT per configuration", F.tpot_bars(frame),
        "Mean decode-pass latency of every finished run, fastest first; bounds (oracles, "
        "capacity-ignoring systems) hatched. Hover: the policy's full parameters and its cache.")
    add("Miss-ratio curve", F.miss_ratio_curve(frame),
        "Hit rate vs expert cache size per policy; dashed lines are bounds (oracles).")
    add("TPOT and throughput vs cache size", F.tpot_throughput_vs_cache(frame),
        "Mean decode-pass latency and decode tokens/s as the expert cache grows.")
    add("TPOT vs link bandwidth", F.tpot_vs_bandwidth(frame),
        "Effective host-to-device bandwidth swept; dotted lines mark PCIe 3/4/5 x16 and NVLink-C2C.")
    add("GPU memory x link bandwidth", F.memory_bandwidth_heatmap(frame),
        "Best TPOT over the (non-bound) policies in each cell; blank cells did not fit or were not run.")
    add("Latency breakdown", F.latency_breakdown(frame),
        "Time per token by activity, fastest runs first.")
    ok = F.ok_runs(frame)
    if "timeline_file" in ok.columns and "tpot_ms" in ok.columns:
        with_tl = ok.filter(pl.col("timeline_file").is_not_null()
                            & ~pl.col("policy_label").map_elements(F.is_bound, return_dtype=pl.Boolean)
                            ).sort("tpot_ms")
        shown = with_tl.head(1)
        if len(with_tl) > 1:
            shown = pl.concat([shown, with_tl.tail(1)])
        for row in shown.iter_rows(named=True):
            tl = pl.read_parquet(out_dir / "runs" / row["timeline_file"])
            add(f"Timeline: {row['policy_label']}, {row.get('cache_label')}",
                F.timeline_figure(tl, title=f"Copy/compute timeline — run {row['run_id']} "
                                            f"({row['policy_label']}, {row.get('cache_label')}, "
                                            f"TPOT {row['tpot_ms']:.1f} ms)"),
                "GPU compute stream, host-to-device link and CPU over the recorded iterations.")
    candidates = [validation] if validation else [out_dir / "validation.parquet", out_dir / "validation.csv"]
    for path in candidates:
        if path.is_dir():
            path = path / "validation.parquet"
        if path.is_file():
            val = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path)
            add("Predicted vs measured", F.predicted_vs_measured(val),
                f"Simulator vs real runner ({path.name}, from `expertsim validate`).")
            break
    for trace_key, trace in _distinct_traces(plan):
        add(f"Trace locality: popularity ({trace_key})", F.popularity_figure(trace, f"Expert popularity per layer — {trace_key}"),
            "Share of each layer's lookups that go to each expert.")
        add(f"Trace locality: reuse distance ({trace_key})", F.reuse_distance_figure(trace, f"Reuse distance — {trace_key}"),
            "Per-layer stack distance of every lookup; an LRU cache with K slots per layer hits distances < K.")
    return figs


def _distinct_traces(plan: dict, limit: int = 3):
    from expertsim.analysis.sweep import load_trace

    seen = {}
    for config in plan.get("runs", []):
        key = (config.get("trace_path", config.get("trace")), config.get("trace_requests"),
               config.get("trace_phase", "all"), config.get("trace_max_tokens"), config.get("seed", 0))
        if key not in seen and len(seen) < limit:
            seen[key] = config.get("trace")
    for key, name in seen.items():
        try:
            trace = load_trace(*key)
        except Exception:  # noqa: BLE001 - a trace moved since the sweep: skip its figures
            continue
        yield name, trace


# --- assumptions ------------------------------------------------------------------------------
def assumption_lines(records: list[dict]) -> tuple[list[str], list[str]]:
    """The assumptions every finished run states (in the first run's order), and the lines only
    some runs state, each prefixed with its run's policy and cache."""
    ok = [r for r in records if r.get("status") == "ok"]
    if not ok:
        return [], []
    sets = [set(r.get("assumptions", [])) for r in ok]
    common = [a for a in ok[0].get("assumptions", []) if all(a in s for s in sets)]
    per_run = [a if a.startswith(f"{r.get('policy_label')} ") else f"{r.get('policy_label')} [{r.get('cache_label')}] {a}"
               for r in ok for a in r.get("assumptions", []) if a not in common]
    return common, per_run


def assumptions_section(records: list[dict]) -> str:
    common, per_run = assumption_lines(records)
    if not common and not per_run:
        return ""
    parts = ["<h3>Assumptions</h3><ul>" + "".join(f"<li>{_esc(a)}</li>" for a in common) + "</ul>"]
    if per_run:
        parts.append(f"<details><summary>Per-run assumptions ({len(per_run)} lines)</summary><ul>"
                     + "".join(f"<li>{_esc(a)}</li>" for a in per_run) + "</ul></details>")
    return "".join(parts)


# --- provenance -------------------------------------------------------------------------------
def provenance_section(out_dir: Path, records: list[dict]) -> str:
    import expertsim

    versions = sorted({(r.get("provenance") or {}).get("expertsim_version") for r in records} - {None})
    traces = {}
    models, hardware = {}, {}
    for r in records:
        prov = r.get("provenance") or {}
        cfg = r.get("config", {})
        if prov.get("trace_sha256") or cfg.get("trace"):
            traces[(cfg.get("trace"), prov.get("trace_sha256"))] = cfg.get("trace_path")
        if prov.get("model_spec"):
            models[json.dumps(prov["model_spec"], sort_keys=True, default=str)] = prov["model_spec"]
        if prov.get("hardware_spec"):
            hardware[json.dumps(prov["hardware_spec"], sort_keys=True, default=str)] = prov["hardware_spec"]
    parts = [f"<p>Report written {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')} "
             f"by expertsim {_esc(expertsim.__version__)}; runs made by expertsim "
             f"{_esc(', '.join(versions) or '?')}.</p>"]
    parts.append("<h3>Traces</h3>" + html_table(
        [{"trace": t, "sha256": h or "(synthetic)", "path": p} for (t, h), p in sorted(traces.items(), key=str)]))
    parts.append("<h3>Model specs (after overrides)</h3>" + _spec_table(list(models.values())))
    parts.append("<h3>Hardware specs (after overrides)</h3>" + _spec_table(list(hardware.values())))
    parts.append(assumptions_section(records))
    study = out_dir / "study.toml"
    if study.is_file():
        parts.append("<h3>Study file</h3><pre>" + _esc(study.read_text()) + "</pre>")
    return "\n".join(parts)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _spec_table(specs: list[dict], limit: int = 12) -> str:
    """One column per distinct spec, one row per field; fields that differ first."""
    if not specs:
        return "<p class='note'>(none)</p>"
    flat = [_flatten(s) for s in specs[:limit]]
    fields = list(flat[0])
    differ = [f for f in fields if len({json.dumps(s.get(f), default=str) for s in flat}) > 1]
    same = [f for f in fields if f not in differ]
    rows = [{"field": f, **{f"spec {i + 1}": s.get(f) for i, s in enumerate(flat)}} for f in differ + same]
    note = f"<p class='note'>{len(specs)} distinct specs; showing {len(flat)}.</p>" if len(specs) > limit else ""
    return note + html_table(rows)


# --- the page ---------------------------------------------------------------------------------
FIGURE_FORMATS = ("svg", "pdf", "png")


def check_figure_format(fmt: str | None) -> None:
    """Static export (``--format svg|pdf|png``) goes through plotly's Kaleido; say so before any
    work when it is missing."""
    import importlib.util

    from expertsim.errors import ConfigError

    if fmt is None:
        return
    if fmt not in FIGURE_FORMATS:
        raise ConfigError(f"--format {fmt!r}: give one of {', '.join(FIGURE_FORMATS)}")
    if importlib.util.find_spec("kaleido") is None:
        raise ConfigError(f"--format {fmt} needs Kaleido for plotly's static export: pip install kaleido "
                          f"(it drives a Chrome/Chromium); without it, each figure's camera button in "
                          f"report.html downloads it as SVG")


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "figure"


def export_figures(figs, folder: Path, fmt: str) -> list[Path]:
    """Every figure as DIR/figures/NN-title.FMT (plotly's static export via Kaleido)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (title, fig, _) in enumerate(figs):
        path = folder / f"{i:02d}-{_slug(title)}.{fmt}"
        fig.write_image(path, format=fmt, width=1100, height=fig.layout.height or 500)
        paths.append(path)
    return paths


def write_report(out_dir: str | Path, path: str | Path | None = None, validation: str | Path | None = None,
                 figure_format: str | None = None) -> Path:
    """Write DIR/report.html (or ``path``) and return its path. ``validation``: a
    validation.parquet/.csv (or the `expertsim validate --out` folder) for the predicted vs
    measured figure; default DIR/validation.parquet or .csv when present. ``figure_format``
    (svg, pdf or png): also every figure as a file in DIR/figures/ (needs Kaleido)."""
    import plotly.io as pio

    check_figure_format(figure_format)

    from expertsim.analysis.results import load_results
    from expertsim.analysis.runs import iter_records

    out = Path(out_dir)
    frame = load_results(out)
    records = list(iter_records(out))
    plan_path = out / "plan.json"
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else {"runs": [r["config"] for r in records]}
    baseline = plan.get("baseline")
    name = plan.get("name") or out.name
    import polars as pl

    n_ok = frame.filter(pl.col("status") == "ok").height if "status" in frame.columns else 0
    n_err = frame.height - n_ok
    planned = len(plan.get("runs", []))
    kind = plan.get("kind", "sweep")
    body = [f"<h1>expertsim {'compare' if kind == 'compare' else 'study'}: {_esc(name)}</h1>"]
    if plan.get("description"):
        body.append(f"<p>{_esc(plan['description'])}</p>")
    body.append(f"<p>{frame.height} runs finished of {planned or frame.height} planned: {n_ok} ok, "
                f"{n_err} failed. Swept: {_esc(', '.join(plan.get('swept_keys', [])) or '-')}.</p>")
    body.append("<h2>Summary: best policy per scenario</h2>")
    body.append("<p class='note'>Best = lowest TPOT among feasible policies (bounds excluded); "
                f"speed-up = baseline ({_esc(baseline)}) TPOT / best TPOT.</p>")
    labels = list(dict.fromkeys(c.get("label") for c in plan.get("runs", []) if c.get("label") is not None))
    body.append(html_table(summary_rows(frame, baseline, order=labels)))
    if validation is not None and not Path(validation).exists():
        from expertsim.errors import ConfigError

        raise ConfigError(f"--validation {str(validation)!r} does not exist")
    figs = collect_figures(out, frame, plan, Path(validation) if validation else None)
    body.append("<h2>Figures</h2>")
    for i, (title, fig, caption) in enumerate(figs):
        # The camera button saves an SVG (vector, for a paper) named after the figure.
        div = pio.to_html(fig, full_html=False, include_plotlyjs=(i == 0), div_id=f"plot-{i}",
                          config={"displaylogo": False,
                                  "toImageButtonOptions": {"format": "svg", "filename": _slug(title)}})
        body.append(f"<div class='figure' id='figure-{i}' data-figure='{i}'><h3>{_esc(title)}</h3>{div}"
                    f"<p class='caption'>{_esc(caption)}</p></div>")
    if n_err:
        errs = frame.filter(pl.col("status") != "ok")
        cols = [c for c in ("run_id", "policy", "hardware", "cache_per_layer", "cache_slots", "cache_gb",
                            "error") if c in errs.columns]
        cols[-1:-1] = [c for c in errs.columns if "." in c]
        body.append("<h2>Failed runs</h2>" + html_table(errs.select(cols).to_dicts()))
    body.append("<h2>Configuration and provenance</h2>" + provenance_section(out, records))
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>expertsim: {_esc(name)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")
    target = Path(path) if path else out / REPORT_FILE
    from expertsim.analysis.runs import atomic_write_bytes

    atomic_write_bytes(target, page.encode())
    if figure_format:
        export_figures(figs, out / "figures", figure_format)
    return target
