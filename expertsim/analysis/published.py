"""Predict published end-to-end measurements and compare: ``expertsim validate --published FILE``.

A measurements file (TOML) holds one ``[[measurement]]`` per published number::

    [[measurement]]
    id = "mixoff-a100-2bit-lru"          # unique
    source = "Eliseev & Mazur, arXiv 2312.17238, Table 2"
    value = 2.918                         # the published number
    unit = "tok/s"                        # or "s/token"
    counts_prefill = true                 # the rate divides output tokens by the time incl. prefill
    metric = "e2e"                        # optional: decode | prefill | e2e (default: e2e when
                                          # counts_prefill, else decode)
    group = "a100-2bit"                   # optional: rows ranked against each other
    fit = false                           # optional: use this row to fit (``--fit``)
    fit_group = "a100"                    # optional: rows fitted together (default: the hardware)
    # ... and any run key of a sweep study: model, hardware (preset or TOML path relative to the
    # file), trace (shared trace name or path relative to the file), trace_max_tokens, policy,
    # runtime, cache_per_layer, cache_gb, "model.expert_bits" and other dotted overrides.

An optional top-level ``fit_params = ["runtime.host_us_per_layer", ...]`` lists the dotted keys
``--fit`` may change. Each row is simulated with :func:`expertsim.analysis.sweep.run_one` (the same
path as a sweep), and compared as a speed: ``ratio`` = predicted speed / published speed (for
``s/token`` rows the speeds are the inverses). Reported: ``median_abs_error`` = median of
|ratio - 1| over the rows not used for fitting (also per metric: ``median_abs_error_by_metric``),
``max_abs_error``, and ``rank_agreement`` = the fraction of groups (two rows or more) whose
predicted order equals the published order. Orders are compared pair by pair: two published
values closer than ``rank_tolerance`` (relative, default 1%) are a tie, and a tie is not an
order a prediction can get wrong (a published table reports one run per configuration to three
significant figures; 88.2 vs 88.5 tok/s is not a ranking). The ties are listed per group
(``ties``), and ``--rank-tolerance 0`` compares every pair strictly.

``--fit`` fits ``fit_params`` per fit group on the rows marked ``fit = true``: least squares on
log(ratio) over the parameters' logarithms (scipy.optimize.least_squares), starting from the
values the rows would use; the other rows of the group are then predicted with the fitted values.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

from expertsim.errors import ConfigError

UNITS = ("tok/s", "s/token")
METRICS = {"decode": "tokens_per_s", "prefill": "prefill_tokens_per_s", "e2e": "e2e_tokens_per_s"}
ROW_KEYS = {"id", "source", "value", "unit", "counts_prefill", "metric", "group", "fit", "fit_group", "notes"}


def _toml():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib


def load_measurements(path: str | Path) -> tuple[list[dict], list[str]]:
    """Rows (each: the measurement's own keys plus ``config``, the normalised run config) and the
    file's ``fit_params``. Every row is checked here, before anything runs."""
    from expertsim.analysis.study import _check_specs, normalise_config
    from expertsim.specs import load_hardware

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"measurements file {str(path)!r} does not exist")
    tomllib = _toml()
    try:
        data = tomllib.loads(path.read_bytes().decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a valid TOML measurements file ({exc})") from None
    unknown = sorted(set(data) - {"measurement", "fit_params", "description", "name"})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {unknown}; expected [[measurement]] tables and fit_params")
    raw_rows = data.get("measurement")
    if not isinstance(raw_rows, list) or not raw_rows:
        raise ConfigError(f"{path}: no [[measurement]] tables; see `expertsim validate --help`")
    fit_params = data.get("fit_params", [])
    if not isinstance(fit_params, list) or not all(isinstance(k, str) and "." in k for k in fit_params):
        raise ConfigError(f"{path}: fit_params must list dotted keys, e.g. [\"runtime.host_us_per_layer\"]")
    base = path.resolve().parent
    rows, seen = [], set()
    for i, raw in enumerate(raw_rows):
        where = f"{path}: measurement {raw.get('id', i + 1)!r}"
        mid = raw.get("id")
        if not isinstance(mid, str) or not mid:
            raise ConfigError(f"{path}: measurement {i + 1} has no id; give id = \"...\"")
        if mid in seen:
            raise ConfigError(f"{where}: id used twice; ids must be unique")
        seen.add(mid)
        value = raw.get("value")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{where}: value must be a positive number, got {value!r}")
        unit = raw.get("unit")
        if unit not in UNITS:
            raise ConfigError(f"{where}: unit must be one of {', '.join(UNITS)}, got {unit!r}")
        counts_prefill = raw.get("counts_prefill", False)
        if not isinstance(counts_prefill, bool):
            raise ConfigError(f"{where}: counts_prefill must be true or false, got {counts_prefill!r}")
        metric = raw.get("metric", "e2e" if counts_prefill else "decode")
        if metric not in METRICS:
            raise ConfigError(f"{where}: metric must be one of {', '.join(METRICS)}, got {metric!r}")
        fit = raw.get("fit", False)
        if not isinstance(fit, bool):
            raise ConfigError(f"{where}: fit must be true or false, got {fit!r}")
        run = {k: v for k, v in raw.items() if k not in ROW_KEYS}
        hw = run.get("hardware")
        if isinstance(hw, str) and hw.endswith(".toml") and not Path(hw).is_absolute():
            run["hardware"] = str(base / hw)
        try:
            config = normalise_config(run, base_dir=base)
            load_hardware(config["hardware"])
            _check_specs([config])
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a spec error names the value already
            raise ConfigError(f"{where}: {exc}") from None
        rows.append({"id": mid, "source": str(raw.get("source", "")), "value": float(value), "unit": unit,
                     "metric": metric, "group": raw.get("group"), "fit": fit,
                     "fit_group": str(raw.get("fit_group", config["hardware"])), "config": config})
    return rows, list(fit_params)


def _with_params(config: dict, params: dict[str, float]) -> dict:
    from expertsim.analysis.study import run_id

    out = {k: v for k, v in config.items() if k != "run_id"}
    out.update(params)
    out["run_id"] = run_id(out)
    return out


def _speed(record: dict, metric: str) -> float:
    value = record["metrics"].get(METRICS[metric])
    return float(value) if value is not None else float("nan")


def _run_all(configs: list[dict], jobs: int, progress: Callable[[str], None] | None) -> list[dict]:
    """Every config through the sweep's local runner (run_one in worker processes); the records
    in the configs' order (rows with the same run config share its record)."""
    from expertsim.analysis.sweep import _local

    unique = list({c["run_id"]: c for c in configs}.values())
    records: dict[str, dict] = {}

    def on_result(record: dict) -> None:
        records[record["run_id"]] = record
        if progress:
            progress(f"validate: {len(records)}/{len(unique)} runs")

    _local(unique, min(jobs, len(unique)), on_result)
    return [records[c["run_id"]] for c in configs]


def _current_value(config: dict, key: str) -> float:
    """The value a dotted key has for a run (its override, else the spec's or runtime's)."""
    if key in config:
        return float(config[key])
    from expertsim.policies import make_policy
    from expertsim.sim.cost import runtime_for
    from expertsim.specs import load_hardware, load_model

    head, *rest = key.split(".")
    if head == "runtime":
        obj: Any = runtime_for(make_policy(config["policy"], **config.get("policy_params", {})), config.get("runtime"))
    elif head == "model":
        obj = load_model(config["model"])
    else:
        obj = getattr(load_hardware(config["hardware"]), head)
    for part in rest:
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return float(obj)


def fit_group(rows: list[dict], fit_params: list[str], jobs: int = 1,
              progress: Callable[[str], None] | None = None) -> dict[str, float]:
    """Least squares on log(predicted / published) over log(parameters), on ``rows``."""
    import numpy as np
    from scipy.optimize import least_squares

    # In log space: a parameter at 0 (no overhead) starts from 100 of its unit instead.
    start = np.array([_current_value(rows[0]["config"], k) or 100.0 for k in fit_params])

    # y = 1 + log(parameter / start): a finite-difference step of diff_step x y is a ~2% change of
    # each parameter (the simulator's times are integer ns, so tiny steps would see no change).
    def residuals(y):
        params = dict(zip(fit_params, (start * np.exp(y - 1.0)).tolist()))
        records = _run_all([_with_params(r["config"], params) for r in rows], jobs, None)
        out = []
        for row, rec in zip(rows, records):
            if rec["status"] != "ok":
                raise ConfigError(f"fit: measurement {row['id']!r} failed with {params}: {rec['error']}")
            out.append(math.log(_ratio(row, _speed(rec, row["metric"]))))
        if progress:
            progress(f"fit: {', '.join(f'{k}={v:.4g}' for k, v in params.items())} -> rms log ratio "
                     f"{float(np.sqrt(np.mean(np.square(out)))):.4f}")
        return np.array(out)

    result = least_squares(residuals, np.ones(len(fit_params)), diff_step=0.02, max_nfev=10 * (len(fit_params) + 1))
    return dict(zip(fit_params, (start * np.exp(result.x - 1.0)).tolist()))


def _ratio(row: dict, predicted_speed: float) -> float:
    """Predicted speed / published speed (speeds in tokens per second)."""
    published_speed = row["value"] if row["unit"] == "tok/s" else 1.0 / row["value"]
    return predicted_speed / published_speed


RANK_TOLERANCE = 0.01  # relative: published values closer than this are a tie (see the module docstring)


def group_order(published: dict[str, float], predicted: dict[str, float],
                tolerance: float = RANK_TOLERANCE) -> tuple[bool, list[tuple[str, str]], list[tuple[str, str]]]:
    """Whether ``predicted`` orders the rows of one group as ``published`` does (both: id -> speed,
    higher is faster): every pair whose published speeds differ by at least ``tolerance`` x the
    larger must be ordered the same way by the prediction. Returns (same order, the pairs
    ordered differently, the pairs that are published ties)."""
    ids = list(published)
    wrong, ties = [], []
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            pa, pb = published[a], published[b]
            if abs(pa - pb) < tolerance * max(pa, pb) or pa == pb:
                ties.append((a, b))
                continue
            if not (predicted[a] - predicted[b]) * (pa - pb) > 0:  # NaN (a failed row) counts as wrong
                wrong.append((a, b))
    return not wrong, wrong, ties


def validate_published(path: str | Path, *, fit: bool = False, jobs: int | None = None,
                       progress: Callable[[str], None] | None = None,
                       rank_tolerance: float = RANK_TOLERANCE) -> dict:
    """The report dict: ``rows``, ``median_abs_error``, ``median_abs_error_by_metric``,
    ``max_abs_error``, ``rank_agreement``, ``rank_tolerance``, ``groups``, ``fitted`` (see the
    module docstring)."""
    import numpy as np

    if not (0.0 <= rank_tolerance < 1.0):
        raise ConfigError(f"--rank-tolerance must be in [0, 1) (a relative difference, e.g. 0.01), "
                          f"got {rank_tolerance}")

    rows, fit_params = load_measurements(path)
    jobs = jobs or max(1, min(len(rows), os.cpu_count() or 1))
    fitted: dict[str, dict[str, float]] = {}
    if fit:
        if not fit_params:
            raise ConfigError(f"{path}: --fit needs a top-level fit_params list of dotted keys to fit")
        groups = sorted({r["fit_group"] for r in rows if r["fit"]})
        if not groups:
            raise ConfigError(f"{path}: --fit needs rows marked fit = true")
        for g in groups:
            fitted[g] = fit_group([r for r in rows if r["fit"] and r["fit_group"] == g], fit_params, jobs, progress)
    configs = [_with_params(r["config"], fitted.get(r["fit_group"], {})) for r in rows]
    records = _run_all(configs, jobs, progress)
    out_rows = []
    for row, rec in zip(rows, records):
        ok = rec["status"] == "ok"
        speed = _speed(rec, row["metric"]) if ok else float("nan")
        predicted = speed if row["unit"] == "tok/s" else (1.0 / speed if speed else float("nan"))
        out_rows.append({
            "id": row["id"], "source": row["source"], "group": row["group"], "unit": row["unit"],
            "metric": row["metric"], "published": row["value"], "predicted": predicted,
            "ratio": _ratio(row, speed) if ok else float("nan"), "fit": bool(fit and row["fit"]),
            "status": rec["status"], "error": rec.get("error"),
            "policy": rec.get("policy_label") or row["config"]["policy"], "hardware": row["config"]["hardware"],
            "engine": rec.get("engine_used"),
            "assumptions": rec.get("assumptions", []),
        })
    held = [r for r in out_rows if not r["fit"] and math.isfinite(r["ratio"])]
    errors = [abs(r["ratio"] - 1) for r in held]
    group_names = sorted({r["group"] for r in out_rows if r["group"] is not None})
    groups = []
    for g in group_names:
        members = [r for r in out_rows if r["group"] == g]
        if len(members) < 2:
            continue
        pub = {r["id"]: r["published"] if r["unit"] == "tok/s" else 1 / r["published"] for r in members}
        pred = {r["id"]: r["predicted"] if r["unit"] == "tok/s" else 1 / r["predicted"] for r in members}
        same, wrong, ties = group_order(pub, pred, rank_tolerance)
        groups.append({"group": g, "rows": [m["id"] for m in members], "same_order": bool(same),
                       "misordered": [list(p) for p in wrong], "ties": [list(p) for p in ties]})
    failed = [r["id"] for r in out_rows if r["status"] != "ok"]
    return {
        "file": str(path),
        "rows": out_rows,
        "median_abs_error": float(np.median(errors)) if errors else float("nan"),
        "median_abs_error_by_metric": {
            metric: float(np.median([abs(r["ratio"] - 1) for r in held if r["metric"] == metric]))
            for metric in sorted({r["metric"] for r in held})},
        "max_abs_error": float(max(errors)) if errors else float("nan"),
        "rank_tolerance": rank_tolerance,
        "rank_agreement": (sum(g["same_order"] for g in groups) / len(groups)) if groups else float("nan"),
        "groups": groups,
        "fitted": fitted,
        "failed": failed,
    }


def write_published_report(report: dict, out: str | Path) -> dict[str, Path]:
    """report.json and a self-contained report.html with the predicted-vs-published figure."""
    import json

    from expertsim.analysis.figures import published_scatter

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "published.json", "html": out / "published.html"}
    paths["json"].write_text(json.dumps(report, indent=2, default=str))
    fig = published_scatter(report)
    summary = (f"median |ratio - 1| = {report['median_abs_error']:.3f}, max = {report['max_abs_error']:.3f}, "
               f"rank agreement = {report['rank_agreement']:.2f} over {len(report['groups'])} groups")
    html = fig.to_html(full_html=True, include_plotlyjs=True)
    html = html.replace("<body>", f"<body><h2>expertsim vs published measurements</h2><p>{report['file']}: "
                                  f"{summary}</p>", 1)
    paths["html"].write_text(html)
    return paths
