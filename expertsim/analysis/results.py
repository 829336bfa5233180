"""Result tables: one row a run (run_id, status, error, config columns, metrics), via polars.

``results_frame(DIR)`` reads ``DIR/runs/*.json``; ``write_results(DIR)`` rebuilds
``DIR/results.parquet`` from them. ``apply_filter`` keeps the rows where a SQL condition typed on
the command line holds (polars SQL, never Python ``eval``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from expertsim.errors import ConfigError

RESULTS_FILE = "results.parquet"
LEAD_COLUMNS = ["run_id", "status", "label", "model", "hardware", "policy", "policy_params",
                "cache_per_layer", "cache_slots", "cache_gb", "batch", "engine", "scope", "trace",
                "trace_requests", "trace_phase", "trace_max_tokens", "seed"]
# Text columns every results table has, typed even when every value is null (no run failed).
TEXT_COLUMNS = ["run_id", "status", "error", "policy", "policy_label", "cache_label", "engine_used",
                "runtime_label", "timeline_file", "trace_sha256"]
# Bookkeeping config keys that are not table columns.
_SKIP_CONFIG = {"trace_path", "timeline", "timeline_iterations"}


def record_row(record: dict) -> dict:
    """The flat table row of one run record."""
    config = record.get("config", {})
    row = {"run_id": record["run_id"], "status": record.get("status", "error"),
           "error": record.get("error")}
    for key, value in config.items():
        if key in _SKIP_CONFIG or key == "run_id":
            continue
        if key == "policy_params":
            value = json.dumps(value, sort_keys=True)
        elif isinstance(value, (dict, list)):
            value = json.dumps(value, sort_keys=True)
        elif key in ("cache_per_layer", "cache_slots", "cache_gb"):
            value = str(value)  # a number or "max": one string column
        row[key] = value
    row["policy_label"] = record.get("policy_label") or config.get("policy")
    row["engine_used"] = record.get("engine_used")
    row["runtime_label"] = record.get("runtime_label")  # the software stack the run used
    row["cache_label"] = record.get("cache_label") or (record.get("provenance") or {}).get("cache_config")
    for key, value in record.get("metrics", {}).items():
        row[key] = value
    row["wall_s"] = record.get("wall_s")
    row["timeline_file"] = record.get("timeline_file")
    prov = record.get("provenance") or {}
    row["trace_sha256"] = prov.get("trace_sha256")
    return row


def results_frame(out_dir: str | Path):
    """All runs of a sweep directory as a polars DataFrame (config columns first)."""
    import polars as pl

    from expertsim.analysis.runs import iter_records

    rows = []
    for record in iter_records(out_dir):
        try:
            rows.append(record_row(record))
        except (KeyError, TypeError, AttributeError):  # a hand-edited record: leave it out
            continue
    if not rows:
        return pl.DataFrame(schema={c: pl.String for c in TEXT_COLUMNS})
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    # Mixed int/float in one column (a bandwidth of 16 and 24.5) must become float, not fail.
    for key in columns:
        kinds = {type(r.get(key)) for r in rows if r.get(key) is not None}
        if kinds <= {int, float} and float in kinds:
            for r in rows:
                if r.get(key) is not None:
                    r[key] = float(r[key])
        elif len(kinds) > 1:
            for r in rows:
                if r.get(key) is not None:
                    r[key] = str(r[key])
    frame = pl.DataFrame([{c: r.get(c) for c in columns} for r in rows], infer_schema_length=None)
    frame = frame.with_columns(pl.col(c).cast(pl.String) for c in TEXT_COLUMNS if c in frame.columns)
    lead = [c for c in LEAD_COLUMNS if c in frame.columns]
    overrides = sorted(c for c in frame.columns if "." in c)
    rest = [c for c in frame.columns if c not in lead and c not in overrides]
    # Rows in the plan's order (the study's grid, or compare's entries), then any others by id.
    order = {rid: i for i, rid in enumerate(_planned_run_ids(Path(out_dir)))}
    rank = pl.col("run_id").replace_strict(order, default=len(order), return_dtype=pl.Int64)
    return frame.select(lead + overrides + rest).sort(rank, pl.col("run_id"))


def _planned_run_ids(out_dir: Path) -> list[str]:
    try:
        plan = json.loads((out_dir / "plan.json").read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return [c["run_id"] for c in plan.get("runs", []) if "run_id" in c]


def write_results(out_dir: str | Path) -> Path:
    """Rebuild DIR/results.parquet from the run files (atomically)."""
    out = Path(out_dir)
    frame = results_frame(out)
    path = out / RESULTS_FILE
    tmp = out / f".{RESULTS_FILE}.{os.getpid()}.tmp"
    frame.write_parquet(tmp)
    os.replace(tmp, path)
    return path


def load_results(out_dir: str | Path):
    """The results table, rebuilt when a run file is newer than results.parquet."""
    import polars as pl

    from expertsim.errors import foreign_errors

    out = Path(out_dir)
    if not out.is_dir():
        raise ConfigError(f"{str(out)!r} is not a sweep directory (run `expertsim sweep STUDY --out DIR`)")
    path = out / RESULTS_FILE
    runs = out / "runs"
    newest = max((p.stat().st_mtime for p in runs.glob("*.json")), default=0.0) if runs.is_dir() else 0.0
    if not path.is_file() or path.stat().st_mtime < newest:
        if not runs.is_dir():
            raise ConfigError(f"{str(out)!r} has neither results.parquet nor runs/: not a sweep directory")
        with foreign_errors(ConfigError, f"cannot build a results table from {str(runs)!r}",
                            "remove the files there that are not run records"):
            write_results(out)

    with foreign_errors(ConfigError, f"cannot read {str(path)!r} as a results table",
                        "delete it; `expertsim results` rebuilds it from runs/*.json",
                        hold_native_stderr=True):
        frame = pl.read_parquet(path)
    if frame.height == 0 and runs.is_dir():
        from expertsim.analysis.runs import torn_run_files

        torn = torn_run_files(out)
        if torn:
            raise ConfigError(f"{str(runs)!r} holds {len(torn)} file(s) but no readable run record "
                              f"(first: {torn[0].name}); is this a sweep directory? Run the sweep again "
                              f"to redo torn runs")
    return frame


# --- filters typed on the command line ------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def parse_filter(text: str):
    """A polars expression from a SQL ``WHERE`` condition typed on the command line, e.g.
    ``status = 'ok' AND "link.bandwidth_gbps" >= 64`` (quote column names that hold a dot).

    Parsed by polars' SQL front end (``pl.sql_expr``): a condition, never Python, so the user's
    text cannot run code; table functions and subqueries are not expressions and are refused."""
    import polars as pl

    if not text.strip():
        raise ConfigError("--filter is empty; give a SQL condition such as \"status = 'ok'\"")
    try:
        return pl.sql_expr(text)
    except Exception as exc:  # noqa: BLE001 - polars raises several kinds for a bad condition
        hint = (" (a SQL condition, not Python: write status = 'ok', not pl.col('status') == 'ok')"
                if "pl." in text else "")
        raise ConfigError(f"--filter {text!r} is not a SQL condition: {_first_line(exc)}{hint}; "
                          f"e.g. --filter \"status = 'ok' AND policy = 'lru'\"") from None


def apply_filter(frame, text: str | None):
    """The rows of ``frame`` where the SQL condition ``text`` holds (all rows when empty)."""
    if text is None:
        return frame
    expr = parse_filter(text)
    try:
        return frame.filter(expr)
    except Exception as exc:  # noqa: BLE001 - an unknown column, a type mismatch, ...
        raise ConfigError(f"--filter {text!r} failed on the results: {_first_line(exc)}; "
                          f"columns: {', '.join(frame.columns)}") from None


def format_frame(frame, fmt: str) -> str:
    """The table as text: table (aligned), csv, json (records) or markdown."""
    from expertsim.console import format_value, render_table

    if fmt == "csv":
        return frame.write_csv()
    if fmt == "json":
        return json.dumps(frame.to_dicts(), indent=1, default=str, allow_nan=True)
    if fmt == "table":  # keep lines readable: long messages are cut (csv/json keep them whole)
        return render_table(frame.to_dicts(), frame.columns, right_align=False, max_cell=90)
    if fmt == "markdown":
        rows = frame.to_dicts()
        cols = frame.columns
        if not rows:
            return "(no rows)"
        cells = [[format_value(r[c]).replace("|", "\\|") for c in cols] for r in rows]
        out = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
        out += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(out)
    raise ConfigError(f"--format must be table, csv, json or markdown, got {fmt!r}")


DEFAULT_COLUMNS = ["run_id", "status", "label", "hardware", "policy_label", "cache_label", "tpot_ms",
                   "tokens_per_s", "hit_rate", "h2d_gb", "stall_fraction", "error"]


def select_columns(frame, columns: str | None, *, all_columns: bool = False):
    """``--columns a,b,c``; default a readable subset plus every swept override column."""
    if all_columns:
        return frame
    if columns:
        wanted = [c.strip() for c in columns.split(",") if c.strip()]
        missing = [c for c in wanted if c not in frame.columns]
        if missing:
            raise ConfigError(f"--columns: unknown column(s) {missing}; known: {', '.join(frame.columns)}")
        return frame.select(wanted)
    overrides = [c for c in frame.columns if "." in c]
    chosen = [c for c in DEFAULT_COLUMNS[:3] if c in frame.columns] + overrides + \
             [c for c in DEFAULT_COLUMNS[3:] if c in frame.columns]
    return frame.select(chosen)


def short_labels(rows: list[dict], *, cache: bool = True, width: int = 48) -> list[str]:
    """A short label per result row: the policy name, only the parameters that tell two rows of
    the same policy apart, and (``cache``) the cache; the full ``policy_label`` is for hover text
    and the JSON output."""
    params = []
    for row in rows:
        try:
            params.append(json.loads(row.get("policy_params") or "{}"))
        except (TypeError, json.JSONDecodeError):
            params.append({})
    names = [row.get("policy") or str(row.get("policy_label")) for row in rows]
    labels = []
    for name, row, mine in zip(names, rows, params):
        same = [p for n, p in zip(names, params) if n == name]
        differ = [k for k in mine if len({json.dumps(p.get(k), sort_keys=True, default=str) for p in same}) > 1]
        text = name + (f"({', '.join(f'{k}={mine[k]}' for k in differ)})" if differ else "")
        if cache and row.get("cache_label"):
            text += f" · {row['cache_label']}"
        labels.append(text if len(text) <= width else text[:width - 1] + "…")
    return labels
