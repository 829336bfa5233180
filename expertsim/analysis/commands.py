"""CLI commands `expertsim sweep`, `expertsim results`, `expertsim report`.

Plain typer-annotated functions; expertsim/cli.py registers them with
``app.command("sweep")(sweep)`` etc. Heavy imports (polars, plotly, Ray) happen inside.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Optional

import typer


def sweep(
    study: Path = typer.Argument(..., help="Study TOML (see examples/ and expertsim.analysis.study)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (runs/, results.parquet); resumable."),
    backend: Literal["local", "ray"] = typer.Option("local", "--backend", help="local (processes on this machine) or ray."),
    jobs: int = typer.Option(0, "--jobs", "-j", min=0, help="Parallel runs (default: all local cores)."),
    address: str = typer.Option(None, "--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)."),
    plan_only: bool = typer.Option(False, "--plan", help="Print the number of runs (and how many are done) and exit."),
    retry_errors: bool = typer.Option(False, "--retry-errors", help="Run failed runs again."),
    report: bool = typer.Option(False, "--report", help="Write DIR/report.html when done."),
    figure_format: Optional[Literal["svg", "pdf", "png"]] = typer.Option(None, "--format", help="With --report: also every figure in DIR/figures/ as svg, pdf or png (needs kaleido)."),
) -> None:
    """Run a study's grid of configurations in parallel; an interrupted sweep resumes where it stopped."""
    from expertsim.analysis.study import load_study
    from expertsim.analysis.sweep import plan, run_sweep
    from expertsim.errors import check_output_path

    check_output_path(out, "--out", folder=True)
    from expertsim.analysis.report import check_figure_format

    check_figure_format(figure_format)
    st = load_study(study)
    todo, done = plan(st, out if out.is_dir() else None, retry_errors=retry_errors)
    if plan_only:
        typer.echo(f"{len(st)} runs in {study}: {done} finished in {out}, {len(todo)} to run")
        return
    typer.echo(f"{len(st)} runs: {done} already finished, {len(todo)} to run "
               f"({backend}, {jobs or 'all'} jobs) -> {out}", err=True)
    try:
        summary = run_sweep(st, out, backend=backend, jobs=jobs or None, address=address,
                            retry_errors=retry_errors)
    except KeyboardInterrupt:
        from expertsim.analysis.sweep import finished_run_ids

        typer.echo(f"\ninterrupted: {len(finished_run_ids(out) & set(st.run_ids))} of {len(st)} runs "
                   f"finished in {out}; run the same command again to resume", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"done: {summary.ran} ran ({summary.errors} failed), {summary.skipped} skipped, "
               f"{summary.wall_s:.1f} s, {summary.runs_per_minute:.1f} runs/min; "
               f"results: {summary.results_path}", err=True)
    if report:
        from expertsim.analysis.report import write_report

        typer.echo(f"report: {write_report(out, figure_format=figure_format)}", err=True)


def results(
    out: Path = typer.Argument(..., help="A sweep output directory."),
    fmt: Literal["table", "csv", "json", "markdown"] = typer.Option("table", "--format", "-f", help="table, csv, json or markdown."),
    filter_: str = typer.Option(None, "--filter", help="A SQL condition on the columns, e.g. \"policy = 'lru' AND \\\"link.bandwidth_gbps\\\" >= 64\" (quote names with a dot)."),
    columns: str = typer.Option(None, "--columns", "-c", help="Comma-separated columns (default: a readable subset)."),
    all_columns: bool = typer.Option(False, "--all", help="Every column."),
    sort: str = typer.Option(None, "--sort", help="Sort by this column."),
    limit: int = typer.Option(None, "--limit", min=1, help="At most this many rows (default: all)."),
) -> None:
    """Print a sweep's results, one row a run (run_id, status, config columns, metrics)."""
    from expertsim.analysis.results import apply_filter, format_frame, load_results, select_columns
    from expertsim.errors import ConfigError

    frame = apply_filter(load_results(out), filter_)
    if sort:
        if sort not in frame.columns:
            raise ConfigError(f"--sort: unknown column {sort!r}; known: {', '.join(frame.columns)}")
        frame = frame.sort(sort, nulls_last=True)
    frame = select_columns(frame, columns, all_columns=all_columns)
    if limit:
        frame = frame.head(limit)
    text = format_frame(frame, fmt)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def report(
    out: Path = typer.Argument(..., help="A sweep output directory."),
    path: Path = typer.Option(None, "--path", help="Where to write the HTML (default DIR/report.html)."),
    validation: Path = typer.Option(None, "--validation", help="validation.parquet (or the folder) from `expertsim validate` (default: DIR/validation.parquet if present)."),
    figure_format: Optional[Literal["svg", "pdf", "png"]] = typer.Option(None, "--format", help="Also write every figure to DIR/figures/ as svg, pdf or png (plotly's static export; needs `pip install kaleido`)."),
) -> None:
    """Write one self-contained HTML report (works offline) of a sweep or compare directory."""
    from expertsim.analysis.report import write_report
    from expertsim.errors import ConfigError, check_output_path

    if not out.is_dir():
        raise ConfigError(f"{str(out)!r} is not a sweep directory (run `expertsim sweep STUDY --out DIR`)")
    check_output_path(path if path is not None else out / "report.html", "--path")
    typer.echo(str(write_report(out, path, validation, figure_format)))


def register(app: typer.Typer) -> None:
    """Add the three commands to the `expertsim` app."""
    app.command("sweep")(sweep)
    app.command("results")(results)
    app.command("report")(report)
