"""The measuring half of validation: calibrate a device, then replay one trace slice under
several policies, and write everything to a folder (torch + numpy + json only).

``benchmarks/gpu_validate.py`` runs this on a GPU machine; ``expertsim validate --device cpu``
runs it in-process; ``expertsim validate --measured DIR`` then predicts with the simulator and
compares, anywhere. The folder holds:

- ``bundle.npz``: the trace slice and the shrunk ModelSpec (``shrink.write_bundle``);
- ``profile.json``: the calibration (``profile.py``);
- ``measured.json``: device, settings, and per policy its spec string, label, cache, metrics,
  per-pass records (iteration, request, phase, tokens, start_ns, end_ns, hits, misses, stall_ns)
  and totals;
- ``timeline-<i>.npz``: policy i's timeline columns (the simulator's Timeline columns).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from expertsim.errors import ConfigError, PolicyError

DEFAULT_POLICIES = ("no-cache", "lru:2", "lru:4", "all-on-gpu")
PREFETCHING_SYSTEMS = ("pregated-moe", "mixtral-offloading")  # the first registered one


def default_policies() -> list[str]:
    """no-cache, LRU with 2 and 4 slots per layer, all-on-GPU, and a prefetching system (with
    4 slots per layer) when one is registered."""
    from expertsim.policies import system_names

    names = system_names()
    out = list(DEFAULT_POLICIES)
    for name in PREFETCHING_SYSTEMS:
        if name in names:
            out.insert(3, f"{name}:4")
            break
    return out


def parse_policy(text: str):
    """``NAME[:K]`` -> (System, CacheConfig or None); K = slots per MoE layer."""
    from expertsim.policies import CacheConfig, make_policy

    name, _, k = text.partition(":")
    if k and not k.isdigit():
        raise PolicyError(f"policy {text!r}: write NAME or NAME:K with K slots per layer, e.g. lru:2")
    system = make_policy(name)
    return system, CacheConfig(per_layer=int(k)) if k else None


def median_records(runs: list[list[dict]]) -> list[dict]:
    """One replay's per-pass records with every pass's latency (and stall) the median over
    repeated replays, passes laid end to end from the first replay's start: a pass that a busy
    machine's scheduler delayed in one repeat does not count as the device's time."""
    first = runs[0]
    dur = np.median([[r["end_ns"] - r["start_ns"] for r in run] for run in runs], axis=0)
    stall = np.median([[r["stall_ns"] for r in run] for run in runs], axis=0)
    out, t = [], int(first[0]["start_ns"]) if first else 0
    for r, d, st in zip(first, dur, stall):
        out.append({**r, "start_ns": t, "end_ns": t + int(round(d)), "stall_ns": int(round(st))})
        t += int(round(d))
    return out


def merge_profiles(a: dict, b: dict) -> dict:
    """The mean of two calibrations of the same device and model (every table's ns)."""
    from expertsim.real_runner.profile import fit_copy_line

    out = dict(a)
    for name, table in a.items():
        if isinstance(table, dict) and "ns" in table:
            ns = (np.asarray(table["ns"], dtype=float) + np.asarray(b[name]["ns"], dtype=float)) / 2
            out[name] = {**table, "ns": np.rint(ns).astype(np.int64).tolist()}
    overhead, bandwidth = fit_copy_line(out["copy"]["bytes"], out["copy"]["ns"])
    out["copy_overhead_ns"], out["copy_bandwidth_gbps"] = round(overhead), round(bandwidth, 3)
    out["notes"] = a.get("notes", "") + "; the mean of a calibration before and one after the replays"
    return out


def measure(trace, spec, device: str, out_dir: str | Path, *, policies: list[str] | None = None,
            link_gbps: float | None = None, quick: bool = False, settings: dict | None = None,
            repeats: int = 1, clock: str = "wall", progress=None) -> Path:
    """Calibrate ``device`` for ``spec`` and replay ``trace`` under each policy (``repeats``
    times, per-pass medians: see :func:`median_records`); write ``out_dir``."""
    from expertsim.real_runner.calibrate import calibrate
    from expertsim.real_runner.device import make_device, torch_dtype
    from expertsim.real_runner.profile import save_profile
    from expertsim.real_runner.replay import Replayer
    from expertsim.real_runner.shrink import write_bundle
    from expertsim.real_runner.weights import ExpertStore

    say = progress or (lambda msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    policies = list(policies or default_policies())
    parsed = [(p, *parse_policy(p)) for p in policies]  # fail on a bad name before any work
    for text, system, config in parsed:
        if config is None and system.cache_config(spec) is None:
            raise ConfigError(f"policy {text!r} needs a cache size: write {text}:K (K slots per layer)")
    settings = {**(settings or {}), "device": device, "link_gbps": link_gbps, "quick": quick,
                "policies": policies, "repeats": repeats, "clock": clock}
    write_bundle(out / "bundle.npz", trace, spec, settings)
    wall0 = time.perf_counter()
    dev = make_device(device, link_gbps=link_gbps, clock=clock)
    try:
        say(f"building {spec.name}: {spec.num_moe_layers} MoE layers x {spec.num_experts} experts of "
            f"{spec.expert_bytes() / 2**20:.1f} MiB on {dev.name}")
        store = ExpertStore(spec, dev, torch_dtype(spec.dtype))
        passes = np.diff(trace.pass_starts())
        max_tokens = int(passes.max()) if len(passes) else 1
        max_context = int(trace.position.max()) + 1 if trace.num_tokens else 1
        t0 = time.perf_counter()

        def calibrate_now():
            return calibrate(spec, dev, max_tokens=max_tokens, max_context=max(max_context, 64),
                             quick=quick, store=store, progress=say)

        before = calibrate_now()
        calibrate_s = time.perf_counter() - t0
        # Replays round-robin over the policies, so that a machine whose load drifts does not
        # favour the policies replayed first.
        results: list[list] = [[] for _ in parsed]
        walls = [0.0] * len(parsed)
        for rep in range(max(1, repeats)):
            for i, (text, system, config) in enumerate(parsed):
                t0 = time.perf_counter()
                if rep:
                    system, config = parse_policy(text)  # fresh policy state
                result = Replayer(spec, system, dev, config, store=store, timeline=rep == 0).run(trace)
                if not result.outputs_finite:
                    raise RuntimeError(f"policy {text}: non-finite outputs: an expert computed before its "
                                       f"copy landed (a missing dependency in the real runner)")
                results[i].append(result)
                walls[i] += time.perf_counter() - t0
                say(f"replayed {text} ({rep + 1}/{max(1, repeats)}): TPOT {result.metrics()['tpot_ms']:.3f} ms, "
                    f"hit rate {result.metrics()['hit_rate']:.3f}, {time.perf_counter() - t0:.1f} s")
        # With repeats, calibrate again after the replays and keep the mean of the two, so the
        # profile brackets the replays in time.
        profile = before if repeats <= 1 else merge_profiles(before, calibrate_now())
        save_profile(profile, out / "profile.json")
        runs = []
        for i, (text, system, config) in enumerate(parsed):
            result = results[i][0]
            repeat_tpot = [r.metrics()["tpot_ms"] for r in results[i]]
            if len(results[i]) > 1:
                result.records = median_records([r.records for r in results[i]])
                result.totals.stall_ns = sum(r["stall_ns"] for r in result.records)
            np.savez_compressed(out / f"timeline-{i}.npz",
                                **{k: np.asarray(v) for k, v in result.timeline.items()})
            runs.append({"policy": text, "label": system.label, "cache": result.config["cache"],
                         "metrics": result.metrics(), "records": result.records, "totals": result.totals.as_dict(),
                         "repeats": len(results[i]), "repeat_tpot_ms": repeat_tpot, "wall_s": walls[i]})
        doc = {"format": "expertsim-measured", "version": 1, "device": dev.name, "model": spec.name,
               "settings": settings, "calibrate_s": calibrate_s,
               "wall_s": time.perf_counter() - wall0, "runs": runs}
        (out / "measured.json").write_text(json.dumps(doc, indent=1))
    finally:
        dev.close()
    return out


def read_measured(out_dir: str | Path) -> dict:
    """The folder's measured.json, with ``bundle`` (trace, spec, settings) and ``profile``."""
    from expertsim.real_runner.profile import load_profile
    from expertsim.real_runner.shrink import read_bundle

    out = Path(out_dir)
    path = out / "measured.json"
    if not path.is_file():
        raise ConfigError(f"{str(out)!r} has no measured.json; run benchmarks/gpu_validate.sh or "
                          f"`expertsim validate --device cpu --out {out}` first")
    doc = json.loads(path.read_text())
    doc["trace"], doc["spec"], _ = read_bundle(out / "bundle.npz")
    doc["profile"] = load_profile(out / "profile.json")
    return doc
