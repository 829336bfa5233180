"""Measure the real runner on one device for `expertsim validate --measured DIR`.

Runs on a machine with python3, torch and numpy only (no polars, plotly, simpy, typer; no
network): it imports expertsim.real_runner, never the simulator. It calibrates the device for
the (shrunk) model and replays the trace slice under each policy, then writes DIR (see
expertsim/real_runner/measure.py for the files). Predictions and errors are computed anywhere
later with `expertsim validate --measured DIR`.

    benchmarks/gpu_validate.sh --bundle slice.npz --out DIR        # on the GPU machine
    expertsim validate --export slice.npz --model mixtral-8x7b --trace T   # makes the bundle

Without --bundle it uses the built-in synthetic Mixtral trace (needs Python >= 3.11 for the
TOML presets). --device cpu runs the same on the emulated device (CI runs a tiny slice).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

HEAVY = ("polars", "plotly", "simpy", "typer", "sklearn", "expertsim.sim")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--bundle", help="trace slice + shrunk spec (.npz) from `expertsim validate --export`")
    ap.add_argument("--out", default="gpu-validate-out", help="folder for the measurements")
    ap.add_argument("--policies", help="comma-separated NAME[:K]; default: the validation set")
    ap.add_argument("--model", default="mixtral-8x7b", help="without --bundle: model preset")
    ap.add_argument("--layers", type=int, default=4, help="without --bundle: MoE layers kept")
    ap.add_argument("--experts-scale", type=float, default=None, help="without --bundle: width scale")
    ap.add_argument("--max-tokens", type=int, default=None, help="first M tokens of the trace")
    ap.add_argument("--dtype", default=None, help="without --bundle: expert storage dtype")
    ap.add_argument("--link-gbps", type=float, default=None, help="cpu: emulated link bandwidth")
    ap.add_argument("--repeats", type=int, default=1, help="replays per policy (per-pass medians)")
    ap.add_argument("--clock", default="wall", choices=("wall", "cpu"), help="cpu device: wall or cpu clock")
    ap.add_argument("--quick", action="store_true", help="quick calibration")
    args = ap.parse_args(argv)

    import torch

    from expertsim.real_runner.measure import measure
    from expertsim.real_runner.shrink import read_bundle, shrink_model, slice_layers

    t0 = time.perf_counter()
    if args.bundle:
        trace, spec, settings = read_bundle(args.bundle)
        if args.max_tokens:
            trace = trace.max_tokens(args.max_tokens)
    else:
        from expertsim.specs import load_model
        from expertsim.traces.synth import default_trace

        cpu = args.device == "cpu"
        scale = args.experts_scale if args.experts_scale is not None else (0.0625 if cpu else 1.0)
        dtype = args.dtype or ("fp32" if cpu else None)
        spec = shrink_model(load_model(args.model), layers=args.layers, experts_scale=scale, dtype=dtype)
        trace = slice_layers(default_trace(), args.layers)
        if args.max_tokens:
            trace = trace.max_tokens(args.max_tokens)
        settings = {"trace": "synthetic default", "layers": args.layers, "experts_scale": scale}
    link = args.link_gbps if args.link_gbps is not None else (1.0 if args.device == "cpu" else None)
    policies = [p.strip() for p in args.policies.split(",")] if args.policies else None
    settings = {**settings, "python": platform.python_version(), "torch": torch.__version__,
                "host": platform.node(), "script": "benchmarks/gpu_validate.py"}
    out = measure(trace, spec, args.device, args.out, policies=policies, link_gbps=link, quick=args.quick,
                  settings=settings, repeats=args.repeats, clock=args.clock, progress=lambda msg: print(msg, flush=True))
    heavy = sorted(m for m in HEAVY if m in sys.modules)
    doc = json.loads((Path(out) / "measured.json").read_text())
    summary = {"out": str(out), "device": doc["device"], "model": spec.name, "tokens": trace.num_tokens,
               "wall_s": round(time.perf_counter() - t0, 1), "heavy_modules_imported": heavy,
               "tpot_ms": {r["policy"]: round(r["metrics"]["tpot_ms"], 4) for r in doc["runs"]}}
    print(json.dumps(summary, indent=1))
    if heavy:
        print(f"error: the GPU side imported {heavy}; it must need torch and numpy only", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
