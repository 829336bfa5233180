"""`expertsim calibrate` and `expertsim validate` (registered on the main app by ``cli.py``).

This module imports typer only; torch, the simulator, polars and plotly load inside the commands.
"""
from __future__ import annotations

import json

import typer

from expertsim.errors import ConfigError, check_option_number, check_output_path

# Per-device defaults: the CPU emulation shrinks the model hard and stores fp32 (bf16 GEMMs are
# slow on most CPUs) behind an emulated 1 GB/s link, so that copies cost several expert
# computes, as over PCIe; a GPU keeps Mixtral's full expert width in its own dtype.
DEVICE_DEFAULTS = {
    "cpu": {"layers": 4, "experts_scale": 0.0625, "dtype": "fp32", "link_gbps": 1.0, "max_tokens": 1000,
            "repeats": 3},
    "cuda": {"layers": 4, "experts_scale": 1.0, "dtype": None, "link_gbps": None, "max_tokens": 1200,
             "repeats": 1},
}


def _check_numbers(experts_scale: float | None, link_gbps: float | None) -> None:
    check_option_number("--experts-scale", experts_scale, high=1e3, unit="x")
    check_option_number("--link-gbps", link_gbps, high=1e6, unit="GB/s")


def _defaults(device: str, **given):
    if device not in DEVICE_DEFAULTS:
        raise ConfigError(f"--device must be cuda or cpu, got {device!r}")
    return {k: (given[k] if given.get(k) is not None else v) for k, v in DEVICE_DEFAULTS[device].items()}


def _echo_json(obj) -> None:
    def default(value):
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        return str(value)

    typer.echo(json.dumps(obj, indent=2, default=default))


def calibrate_command(
    device: str = typer.Option("cuda", "--device", "-d", help="cuda (a GPU) or cpu (the emulated device)."),
    model: str = typer.Option("mixtral-8x7b", "--model", "-m", help="Model preset or TOML file."),
    out: str = typer.Option("profile.json", "--out", "-o", help="Where to write the profile (JSON)."),
    layers: int = typer.Option(None, "--layers", min=1, help="Keep the first N MoE layers (default: per device)."),
    experts_scale: float = typer.Option(None, "--experts-scale", help="Scale d_model/d_ff by S (default: per device)."),
    dtype: str = typer.Option(None, "--dtype", help="Store experts as fp32, bf16 or fp16 (default: the model's; fp32 on cpu)."),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="Largest pass (tokens) to time."),
    max_context: int = typer.Option(2048, "--max-context", min=1, help="Longest KV length to time."),
    link_gbps: float = typer.Option(None, "--link-gbps", help="cpu only: emulated link bandwidth (GB/s)."),
    clock: str = typer.Option("wall", "--clock", help="cpu only: wall or cpu (the emulated device's own clock)."),
    quick: bool = typer.Option(False, "--quick", help="Fewer points and repetitions (seconds, for CI)."),
    as_json: bool = typer.Option(False, "--json", help="Print the profile as JSON."),
) -> None:
    """Measure a device (copy bandwidth vs size, pinned and pageable, per-copy overhead, expert
    FFN vs tokens, dense layer vs tokens and KV length, CPU expert) into a profile for
    `expertsim simulate --profile`."""
    from expertsim.real_runner.calibrate import calibrate
    from expertsim.real_runner.device import make_device
    from expertsim.real_runner.profile import save_profile
    from expertsim.real_runner.shrink import shrink_model
    from expertsim.specs import load_model

    _check_numbers(experts_scale, link_gbps)
    check_output_path(out, "--out")
    d = _defaults(device, layers=layers, experts_scale=experts_scale, dtype=dtype, link_gbps=link_gbps)
    spec = shrink_model(load_model(model), layers=d["layers"], experts_scale=d["experts_scale"], dtype=d["dtype"])
    dev = make_device(device, link_gbps=d["link_gbps"], clock=clock if device == "cpu" else "wall")
    try:
        profile = calibrate(spec, dev, max_tokens=max_tokens, max_context=max_context, quick=quick,
                            progress=lambda msg: typer.echo(msg, err=True))
    finally:
        dev.close()
    path = save_profile(profile, out)
    if as_json:
        _echo_json(profile)
        return
    typer.echo(f"profile: {path} ({profile['device']}, {spec.name})")
    typer.echo(f"copy: {profile['copy_bandwidth_gbps']:.2f} GB/s + {profile['copy_overhead_ns'] / 1e3:.1f} us per copy; "
               f"one expert ({profile['expert_bytes'] / 2**20:.1f} MiB) {profile['copy']['ns'][-1] / 1e6:.3f} ms")
    typer.echo(f"expert FFN (1 token): {profile['expert']['ns'][0] / 1e6:.3f} ms; dense layer (1 token): "
               f"{profile['dense']['ns'][0][0] / 1e6:.3f} ms; CPU expert (1 token): {profile['cpu_expert']['ns'][0] / 1e6:.3f} ms")


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
        _validate_published(published, fit=fit, jobs=jobs, out=out, as_json=as_json)
        return
    if fit:
        raise ConfigError("--fit needs --published FILE (a measurements file with fit_params)")
    out = out or "expertsim-validate"
    from expertsim.validate import prepare_slice, validate

    _check_numbers(experts_scale, link_gbps)
    d = _defaults(device, layers=layers, experts_scale=experts_scale, dtype=dtype, link_gbps=link_gbps,
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
        _echo_json({**{k: report[k] for k in keys}, "median_abs_error_ms": report["median_abs_error_ms"],
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


def _validate_published(path: str, *, fit: bool, jobs: int | None, out: str | None, as_json: bool) -> None:
    """``expertsim validate --published FILE``: the simulator against published measurements."""
    import math

    from expertsim.analysis.published import validate_published, write_published_report

    if out:
        check_output_path(out, "--out", folder=True)
    report = validate_published(path, fit=fit, jobs=jobs, progress=lambda msg: typer.echo(msg, err=True))
    paths = write_published_report(report, out) if out else {}
    if as_json:
        keep = ("id", "group", "published", "predicted", "unit", "metric", "ratio", "fit", "status", "error",
                "policy", "hardware", "engine")
        _echo_json({"file": report["file"], "median_abs_error": report["median_abs_error"],
                    "max_abs_error": report["max_abs_error"], "rank_agreement": report["rank_agreement"],
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
        typer.echo(f"# group {g['group']}: {'same order as published' if g['same_order'] else 'ORDER DIFFERS'}")
    for row in report["rows"]:
        if row["status"] != "ok":
            typer.echo(f"# {row['id']} failed: {row['error']}")
    if report["fitted"]:
        for group, values in report["fitted"].items():
            typer.echo(f"# fitted for {group}: " + ", ".join(f"{k} = {v:.4g}" for k, v in values.items()))
    typer.echo(f"median |ratio - 1| = {report['median_abs_error']:.3f}; max = {report['max_abs_error']:.3f}; "
               f"rank agreement = {report['rank_agreement']:.2f} ({len(report['groups'])} groups)")
    for kind, p in paths.items():
        typer.echo(f"{kind}: {p}")
