"""Validation of the simulator against the real runner: the same trace slice, model and policies,
simulated with the calibrated profile and replayed on a device, compared pass by pass.

It lives in ``analysis`` because it needs both engines (``analysis -> sim, real_runner``), which
never import each other; its command (``expertsim validate``) is in
:mod:`expertsim.analysis.commands`. Measuring (``expertsim.real_runner.measure``) may happen on
another machine (``benchmarks/gpu_validate.sh``); :func:`compare_measured` then needs only the
folder it wrote.

Reported per policy: measured and predicted TPOT, the per-token error (decode passes:
|predicted - measured| / measured, median and p95, and the same in ms), the total-time error
((predicted - measured) / measured over the whole slice), both hit rates (equal for policies
whose decisions do not depend on timing), and over the policies the Kendall tau between the
measured and the predicted TPOT ranking. Overall ``median_abs_error`` and ``p95_abs_error`` pool
the decode passes of every policy; ``total_time_error`` is (sum predicted - sum measured) / sum
measured over the policies.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from expertsim.policies.records import RunTotals


def profile_hardware(profile: dict):
    """A HardwareSpec that states the calibrated link (for the printed assumptions and the
    copy's overhead phase); the times themselves come from the profile's tables."""
    from expertsim.specs import CpuSpec, GpuSpec, HardwareSpec, LinkSpec

    bw = profile.get("copy_bandwidth_gbps") or 1.0
    bw = bw if np.isfinite(bw) and bw > 0 else 1.0
    return HardwareSpec(
        name=f"calibrated {profile['device']}",
        gpu=GpuSpec(memory_gb=1e6, hbm_bandwidth_gbps=1.0, tflops={"bf16": 1.0}),
        link=LinkSpec(kind="calibrated", bandwidth_gbps=float(bw),
                      per_copy_overhead_us=float(profile.get("copy_overhead_ns", 0)) / 1e3),
        cpu=CpuSpec(tflops=1.0, memory_bandwidth_gbps=1.0),
        source="expertsim calibrate",
    )


def simulate_policy(spec, trace, policy: str, profile: dict, profile_path: str | Path):
    """The simulator's RunResult for ``policy`` (NAME[:K]) with the profile's costs
    (``expertsim simulate --profile``: ``SimOptions.profile``) and the runner's link: one copy
    stream, copies in issue order, none dropped (``link_queue="fifo"``)."""
    from expertsim.real_runner.measure import parse_policy
    from expertsim.sim import SimOptions, Simulation

    system, config = parse_policy(policy)
    sim = Simulation(spec, profile_hardware(profile), system, config,
                     options=SimOptions(timeline=True, check_memory=False, profile=str(profile_path),
                                        link_queue="fifo"))
    return sim.run(trace)


def kendall_tau(a, b) -> float:
    """Kendall's tau-b of two equally long sequences (1 = same order, -1 = reversed; NaN when
    either is constant or shorter than 2): scipy.stats.kendalltau."""
    from scipy.stats import kendalltau

    return float(kendalltau(a, b).statistic) if len(a) >= 2 else float("nan")


def _durations(records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    start = np.array([r["start_ns"] for r in records], dtype=np.int64)
    end = np.array([r["end_ns"] for r in records], dtype=np.int64)
    phase = np.array([r["phase"] for r in records], dtype=np.int64)
    return end - start, phase


def compare_measured(measured_dir: str | Path, *, progress=None) -> dict:
    """Predict every measured policy with the simulator and compare. Returns the report dict
    (overall numbers, ``policies`` list, ``per_token`` rows)."""
    from expertsim.real_runner.measure import read_measured

    say = progress or (lambda msg: None)
    doc = read_measured(measured_dir)
    trace, spec, profile = doc["trace"], doc["spec"], doc["profile"]
    policies, per_token, all_rel, all_abs = [], [], [], []
    for run in doc["runs"]:
        say(f"simulating {run['policy']}")
        result = simulate_policy(spec, trace, run["policy"], profile, Path(measured_dir) / "profile.json")
        meas_d, phase = _durations(run["records"])
        pred_d, pred_phase = _durations(result.iterations)
        if len(meas_d) != len(pred_d) or (phase != pred_phase).any():
            raise RuntimeError(f"{run['policy']}: the runner replayed {len(meas_d)} passes, the simulator "
                               f"{len(pred_d)}: they did not walk the same trace")
        decode = phase == 1
        rel = np.abs(pred_d - meas_d)[decode] / np.maximum(meas_d[decode], 1)
        abs_ms = np.abs(pred_d - meas_d)[decode] / 1e6
        all_rel.append(rel)
        all_abs.append(abs_ms)
        meas_total, pred_total = float(meas_d.sum()), float(pred_d.sum())
        m_hits = sum(r["hits"] for r in run["records"])
        m_miss = sum(r["misses"] for r in run["records"])
        policies.append({
            "policy": run["policy"], "label": run["label"], "cache": run["cache"],
            "measured_tpot_ms": float(meas_d[decode].mean() / 1e6) if decode.any() else float("nan"),
            "predicted_tpot_ms": float(pred_d[decode].mean() / 1e6) if decode.any() else float("nan"),
            "median_abs_error": float(np.median(rel)) if len(rel) else float("nan"),
            "p95_abs_error": float(np.percentile(rel, 95)) if len(rel) else float("nan"),
            "median_abs_error_ms": float(np.median(abs_ms)) if len(abs_ms) else float("nan"),
            "total_time_error": (pred_total - meas_total) / meas_total if meas_total else float("nan"),
            "measured_total_s": meas_total / 1e9, "predicted_total_s": pred_total / 1e9,
            "measured_hit_rate": m_hits / (m_hits + m_miss) if m_hits + m_miss else float("nan"),
            "predicted_hit_rate": result.metrics["hit_rate"],
            "hits_equal": m_hits == result.metrics["hits"] and m_miss == result.metrics["misses"],
            "measured_stall_s": RunTotals.from_dict(run["totals"]).stall_ns / 1e9,
            "predicted_stall_s": result.metrics["stall_s"],
        })
        for r, m, p in zip(run["records"], meas_d, pred_d):
            per_token.append({"policy": run["policy"], "iteration": r["iteration"], "request": r["request"],
                              "phase": "decode" if r["phase"] == 1 else "prefill", "tokens": r["tokens"],
                              "measured_ms": m / 1e6, "predicted_ms": p / 1e6})
    rel = np.concatenate(all_rel) if all_rel else np.zeros(0)
    abs_ms = np.concatenate(all_abs) if all_abs else np.zeros(0)
    meas_sum = sum(p["measured_total_s"] for p in policies)
    pred_sum = sum(p["predicted_total_s"] for p in policies)
    return {
        "device": doc["device"], "model": spec.name, "trace_tokens": trace.num_tokens,
        "decode_tokens": int((trace.phase == 1).sum()), "settings": doc["settings"],
        "median_abs_error": float(np.median(rel)) if len(rel) else float("nan"),
        "p95_abs_error": float(np.percentile(rel, 95)) if len(rel) else float("nan"),
        "median_abs_error_ms": float(np.median(abs_ms)) if len(abs_ms) else float("nan"),
        "total_time_error": (pred_sum - meas_sum) / meas_sum if meas_sum else float("nan"),
        "kendall_tau": kendall_tau([p["measured_tpot_ms"] for p in policies],
                                   [p["predicted_tpot_ms"] for p in policies]),
        "policies": policies, "per_token": per_token,
    }


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """validation.parquet (one row per policy), per_token.parquet, validation.html (plotly
    scatter of predicted vs measured per-token latency)."""
    import plotly.graph_objects as go
    import polars as pl

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"policies": out / "validation.parquet", "per_token": out / "per_token.parquet",
             "html": out / "validation.html"}
    meta = {k: report[k] for k in ("device", "model", "kendall_tau")}
    pl.DataFrame(report["policies"]).with_columns(
        *(pl.lit(v).alias(k) for k, v in meta.items())).write_parquet(paths["policies"])
    tokens = pl.DataFrame(report["per_token"])
    tokens.write_parquet(paths["per_token"])
    fig = go.Figure()
    decode = tokens.filter(pl.col("phase") == "decode")
    for (policy,), part in decode.group_by("policy", maintain_order=True):
        fig.add_trace(go.Scattergl(x=part["measured_ms"].to_list(), y=part["predicted_ms"].to_list(),
                                   mode="markers", name=policy, marker={"size": 4, "opacity": 0.6}))
    if decode.height:
        hi = float(max(decode["measured_ms"].max(), decode["predicted_ms"].max()))
        fig.add_trace(go.Scatter(x=[0, hi], y=[0, hi], mode="lines", name="predicted = measured",
                                 line={"dash": "dash", "color": "gray"}))
    fig.update_layout(
        title=(f"Per-token latency, decode passes: simulator vs {report['device']} ({report['model']})<br>"
               f"median |error| {report['median_abs_error']:.1%}, p95 {report['p95_abs_error']:.1%}, "
               f"Kendall tau {report['kendall_tau']:.2f}"),
        xaxis_title="measured latency (ms)", yaxis_title="predicted latency (ms)", template="plotly_white")
    fig.write_html(paths["html"], include_plotlyjs=True)
    return paths


def prepare_slice(model: str, trace_path: str | None, *, layers: int, experts_scale: float,
                  max_tokens: int | None, dtype: str | None):
    """(shrunk spec, trace slice): the first ``layers`` MoE layers, the first ``max_tokens``
    tokens (cut at a pass boundary)."""
    from expertsim.real_runner.shrink import shrink_model, slice_layers
    from expertsim.specs import load_model

    if trace_path is None:
        from expertsim.traces.synth import default_trace

        trace = default_trace()
    else:
        from expertsim.traces import read_trace

        trace = read_trace(trace_path)
    full = load_model(model)
    trace.check_model(full)
    if max_tokens:
        trace = trace.max_tokens(max_tokens)
    spec = shrink_model(full, layers=layers, experts_scale=experts_scale, dtype=dtype)
    return spec, slice_layers(trace, layers)


def validate(*, device: str, model: str, trace_path: str | None, layers: int, experts_scale: float,
             max_tokens: int | None, out: str | Path, policies: list[str] | None = None,
             dtype: str | None = None, link_gbps: float | None = None, quick: bool = False,
             measured: str | Path | None = None, repeats: int = 1, clock: str = "wall",
             progress=None) -> tuple[dict, dict]:
    """Measure (unless ``measured`` names a folder already written), predict, compare, write.
    Returns (report, paths)."""
    from expertsim.real_runner.measure import measure

    out = Path(out)
    if measured is None:
        spec, trace = prepare_slice(model, trace_path, layers=layers, experts_scale=experts_scale,
                                    max_tokens=max_tokens, dtype=dtype)
        measure(trace, spec, device, out / "measured", policies=policies, link_gbps=link_gbps,
                quick=quick, repeats=repeats, clock=clock, settings={"trace": str(trace_path or "synthetic default"),
                                       "layers": layers, "experts_scale": experts_scale,
                                       "max_tokens": max_tokens}, progress=progress)
        measured = out / "measured"
    report = compare_measured(measured, progress=progress)
    return report, write_report(report, out)
