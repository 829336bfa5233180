"""`expertsim calibrate` (registered on the main app by ``cli.py``), and the per-device defaults
and option checks that `expertsim validate` (:mod:`expertsim.analysis.commands`, which needs the
simulator) shares with it.

This module imports typer only; torch loads inside the command. Like the rest of the real
runner, it never imports the simulator or the analysis.
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


def check_device_numbers(experts_scale: float | None, link_gbps: float | None) -> None:
    """--experts-scale and --link-gbps: finite, positive, in range (calibrate and validate)."""
    check_option_number("--experts-scale", experts_scale, high=1e3, unit="x")
    check_option_number("--link-gbps", link_gbps, high=1e6, unit="GB/s")


def device_settings(device: str, **given):
    """DEVICE_DEFAULTS for ``device``, with the options the user gave (not None) in their place."""
    if device not in DEVICE_DEFAULTS:
        raise ConfigError(f"--device must be cuda or cpu, got {device!r}")
    return {k: (given[k] if given.get(k) is not None else v) for k, v in DEVICE_DEFAULTS[device].items()}


def print_json(obj) -> None:
    """``obj`` as indented JSON on stdout (numpy scalars as numbers; numpy alone, no rich)."""
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

    check_device_numbers(experts_scale, link_gbps)
    check_output_path(out, "--out")
    d = device_settings(device, layers=layers, experts_scale=experts_scale, dtype=dtype, link_gbps=link_gbps)
    spec = shrink_model(load_model(model), layers=d["layers"], experts_scale=d["experts_scale"], dtype=d["dtype"])
    dev = make_device(device, link_gbps=d["link_gbps"], clock=clock if device == "cpu" else "wall")
    try:
        profile = calibrate(spec, dev, max_tokens=max_tokens, max_context=max_context, quick=quick,
                            progress=lambda msg: typer.echo(msg, err=True))
    finally:
        dev.close()
    path = save_profile(profile, out)
    if as_json:
        print_json(profile)
        return
    typer.echo(f"profile: {path} ({profile['device']}, {spec.name})")
    typer.echo(f"copy: {profile['copy_bandwidth_gbps']:.2f} GB/s + {profile['copy_overhead_ns'] / 1e3:.1f} us per copy; "
               f"one expert ({profile['expert_bytes'] / 2**20:.1f} MiB) {profile['copy']['ns'][-1] / 1e6:.3f} ms")
    typer.echo(f"expert FFN (1 token): {profile['expert']['ns'][0] / 1e6:.3f} ms; dense layer (1 token): "
               f"{profile['dense']['ns'][0][0] / 1e6:.3f} ms; CPU expert (1 token): {profile['cpu_expert']['ns'][0] / 1e6:.3f} ms")
