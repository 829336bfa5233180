"""CLI commands `expertsim sweep`, `expertsim results`, `expertsim report` and `expertsim validate`.

Plain typer-annotated functions; expertsim/cli.py registers them with
``app.command("sweep")(sweep)`` etc. Heavy imports (polars, plotly, Ray, torch, the simulator)
happen inside. `expertsim validate` lives here, not beside the real runner, because it runs the
simulator too (the real runner never imports it); it shares the runner's per-device defaults.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Optional

import typer

from expertsim.errors import ConfigError, check_output_path
from expertsim.real_runner.commands import check_device_numbers, device_settings, print_json


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


def validate_command(
    device: str = typer.Option("cpu", "--device", "-d", help="cpu (emulated device) or cuda (a GPU)."),
    model: str = typer.Option("mixtral-8x7b", "--model", "-m", help="Model preset or TOML file."),
    trace: str = typer.Option(None, "--trace", "-t", help="Routing trace (.parquet); default: the built-in synthetic trace."),
    layers: int = typer.Option(None, "--layers", min=1, help="Keep the first N MoE layers (default: 4)."),
    experts_scale: float = typer.Option(None, "--experts-scale", help="Scale d_model/d_ff by S (default: 1/16 on cpu, 1 on cuda)."),
    max_tokens: int = typer.Option(None, "--max-tokens", min=1, help="Replay the first M tokens of the trace (default: 1000 on cpu, 1200 on cuda)."),
    out: str = typer.Option(None, "--out", "-o", help="Folder for the measurements, Parquet results and the HTML scatter (default expertsim-validate; with --published: only when given)."),
    published: str = typer.Option(None, "--published", help="A measurements file (TOML, see ../shared/published/dev.toml): predict every published number with the simulator and compare; no device needed."),
    fit: bool = typer.Option(False, "--fit", help="With --published: fit the file's fit_params per fit group on the rows marked fit = true, then predict the others."),
    jobs: int = typer.Option(None, "--jobs", "-j", min=1, help="With --published: simulations in parallel (default: the CPU count)."),
    rank_tolerance: float = typer.Option(0.01, "--rank-tolerance", min=0.0, max=0.99, help="With --published: published values of one group closer than this relative difference are a tie, not an order to match (0 = compare every pair strictly)."),
    policies: str = typer.Option(None, "--policies", help="Comma-separated NAME[:K] (K slots per layer). Default: no-cache, lru:2, lru:4, a prefetching system when registered, all-on-gpu."),
    dtype: str = typer.Option(None, "--dtype", help="Store experts as fp32, bf16 or fp16 (default: fp32 on cpu, the model's on cuda)."),
    link_gbps: float = typer.Option(None, "--link-gbps", help="cpu only: emulated link bandwidth in GB/s (default 1)."),
    measured: str = typer.Option(None, "--measured", help="A folder written by benchmarks/gpu_validate.sh: predict and compare only."),
    export: str = typer.Option(None, "--export", help="Only write the trace slice and shrunk spec to this .npz (for benchmarks/gpu_validate.sh --bundle)."),
    clock: str = typer.Option("wall", "--clock", help="cpu only: wall (the machine's clock) or cpu (the emulated device's own clock: compute thread CPU time, nominal link; for busy machines)."),
    repeats: int = typer.Option(None, "--repeats", min=1, help="Replay each policy R times; per-pass medians (default: 3 on cpu, 1 on cuda)."),
    quick: bool = typer.Option(False, "--quick", help="Quick calibration (CI)."),
    as_json: bool = typer.Option(False, "--json", help="Print median_abs_error, p95_abs_error, total_time_error, kendall_tau and the per-policy list as JSON."),
) -> None:
    """Replay a trace slice on a device under several policies, simulate the same slice with the
    calibrated profile, and report the simulator's error (per-token latency, total time, hit
    rate) and whether it ranks the policies as measured (Kendall tau)."""
    if published:
        _validate_published(published, fit=fit, jobs=jobs, out=out, as_json=as_json,
                            rank_tolerance=rank_tolerance)
        return
    if fit:
        raise ConfigError("--fit needs --published FILE (a measurements file with fit_params)")
    out = out or "expertsim-validate"
    from expertsim.analysis.validate import prepare_slice, validate

    check_device_numbers(experts_scale, link_gbps)
    d = device_settings(device, layers=layers, experts_scale=experts_scale, dtype=dtype, link_gbps=link_gbps,
                  max_tokens=max_tokens, repeats=repeats)
    if export:
        check_output_path(export, "--export")
    else:
        check_output_path(out, "--out", folder=True)
    if not measured:
        # Per-token latency errors need decode tokens: say so now, not NaN after the replay.
        _, sliced = prepare_slice(model, trace, layers=d["layers"], experts_scale=d["experts_scale"],
                                  max_tokens=d["max_tokens"], dtype=d["dtype"])
        if not (sliced.phase == 1).any():
            raise ConfigError(
                f"the slice of {trace or 'the synthetic trace'} (first {d['max_tokens']} tokens) has no "
                f"decode tokens, so there is no per-token latency to validate; raise --max-tokens or "
                f"pick a trace with decode tokens")
    if export:
        from expertsim.real_runner.shrink import write_bundle

        spec, tr = prepare_slice(model, trace, layers=d["layers"], experts_scale=d["experts_scale"],
                                 max_tokens=d["max_tokens"], dtype=d["dtype"])
        path = write_bundle(export, tr, spec, {"trace": str(trace or "synthetic default"), "layers": d["layers"],
                                               "experts_scale": d["experts_scale"], "max_tokens": d["max_tokens"]})
        typer.echo(f"bundle: {path} ({spec.name}, {tr.num_tokens} tokens); run "
                   f"benchmarks/gpu_validate.sh --bundle {path} --out DIR, then "
                   f"expertsim validate --measured DIR")
        return
    policy_list = [p.strip() for p in policies.split(",") if p.strip()] if policies else None
    report, paths = validate(
        device=device, model=model, trace_path=trace, layers=d["layers"], experts_scale=d["experts_scale"],
        max_tokens=d["max_tokens"], out=out, policies=policy_list, dtype=d["dtype"],
        link_gbps=d["link_gbps"] if device == "cpu" else None, quick=quick, measured=measured,
        repeats=d["repeats"], clock=clock if device == "cpu" else "wall",
        progress=lambda msg: typer.echo(msg, err=True))
    keys = ("median_abs_error", "p95_abs_error", "total_time_error", "kendall_tau")
    if as_json:
        print_json({**{k: report[k] for k in keys}, "median_abs_error_ms": report["median_abs_error_ms"],
                    "device": report["device"], "model": report["model"],
                    "decode_tokens": report["decode_tokens"], "policies": report["policies"],
                    "outputs": {k: str(v) for k, v in paths.items()}})
        return
    typer.echo(f"# {report['device']}, {report['model']}, {report['trace_tokens']} tokens "
               f"({report['decode_tokens']} decode); errors are |predicted - measured| / measured per decode pass")
    cols = ["policy", "cache", "measured_tpot_ms", "predicted_tpot_ms", "median_abs_error", "p95_abs_error",
            "total_time_error", "measured_hit_rate", "predicted_hit_rate"]
    rows = [[str(p["policy"]), str(p["cache"])] + [f"{p[c]:.4g}" for c in cols[2:]] for p in report["policies"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    typer.echo("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    typer.echo("overall: " + ", ".join(f"{k} {report[k]:.4g}" for k in keys))
    typer.echo(f"results: {paths['policies']}  per token: {paths['per_token']}  scatter: {paths['html']}")


def _validate_published(path: str, *, fit: bool, jobs: int | None, out: str | None, as_json: bool,
                        rank_tolerance: float) -> None:
    """``expertsim validate --published FILE``: the simulator against published measurements."""
    import math

    from expertsim.analysis.published import validate_published, write_published_report

    if out:
        check_output_path(out, "--out", folder=True)
    report = validate_published(path, fit=fit, jobs=jobs, progress=lambda msg: typer.echo(msg, err=True),
                                rank_tolerance=rank_tolerance)
    paths = write_published_report(report, out) if out else {}
    if as_json:
        keep = ("id", "group", "published", "predicted", "unit", "metric", "ratio", "fit", "status", "error",
                "policy", "hardware", "engine")
        print_json({"file": report["file"], "median_abs_error": report["median_abs_error"],
                    "median_abs_error_by_metric": report["median_abs_error_by_metric"],
                    "max_abs_error": report["max_abs_error"], "rank_agreement": report["rank_agreement"],
                    "rank_tolerance": report["rank_tolerance"],
                    "groups": report["groups"], "fitted": report["fitted"], "failed": report["failed"],
                    "rows": [{k: r[k] for k in keep} for r in report["rows"]],
                    "outputs": {k: str(v) for k, v in paths.items()}})
        return
    typer.echo(f"# {report['file']}: ratio = predicted speed / published speed; error = |ratio - 1|")
    cols = ["id", "policy", "hardware", "unit", "published", "predicted", "ratio", "fit"]
    rows = [[str(r["id"]), str(r["policy"]), str(r["hardware"]), r["unit"], f"{r['published']:.4g}",
             f"{r['predicted']:.4g}" if math.isfinite(r["predicted"]) else "failed",
             f"{r['ratio']:.3f}" if math.isfinite(r["ratio"]) else "-", "yes" if r["fit"] else ""]
            for r in report["rows"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    typer.echo("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    for g in report["groups"]:
        verdict = 'same order as published' if g['same_order'] else \
            'ORDER DIFFERS: ' + ', '.join(f"{a} vs {b}" for a, b in g['misordered'])
        ties = f" (published ties within {report['rank_tolerance']:.0%}: " + \
            ", ".join(f"{a} = {b}" for a, b in g['ties']) + ")" if g['ties'] else ""
        typer.echo(f"# group {g['group']}: {verdict}{ties}")
    for row in report["rows"]:
        if row["status"] != "ok":
            typer.echo(f"# {row['id']} failed: {row['error']}")
    if report["fitted"]:
        for group, values in report["fitted"].items():
            typer.echo(f"# fitted for {group}: " + ", ".join(f"{k} = {v:.4g}" for k, v in values.items()))
    by_metric = ", ".join(f"{k} {v:.3f}" for k, v in report["median_abs_error_by_metric"].items())
    typer.echo(f"median |ratio - 1| = {report['median_abs_error']:.3f} ({by_metric}); max = {report['max_abs_error']:.3f}; "
               f"rank agreement = {report['rank_agreement']:.2f} ({len(report['groups'])} groups)")
    for kind, p in paths.items():
        typer.echo(f"{kind}: {p}")
