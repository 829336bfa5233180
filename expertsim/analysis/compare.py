"""`expertsim compare`: several policies on one model, hardware and trace; a table and a report.

A comparison is a small sweep: each compared policy or system is one run of a study (one
``[[variants]]`` entry each), run in this process (so ``--plugin`` policies work) through the
sweep's ``run_one``, and written in the sweep's layout (``runs/``, ``plan.json``,
``results.parquet``, ``report.html``), so ``expertsim results DIR`` and ``expertsim report DIR``
read a comparison's folder as they read a sweep's. A run that fails (a cache that does not fit)
is a row with status "error" and its reason; the comparison goes on.

The default study (no arguments) is Mixtral-8x7B on an A40 over the built-in synthetic trace
(sampled from the Mixtral fit shipped in expertsim/data), comparing no cache, LRU with 2 and 3
slots per layer (4 bf16 Mixtral experts per layer would not fit in 48 GB beside the dense
weights) and all-on-GPU (a bound that ignores capacity).
"""
from __future__ import annotations

import inspect
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from expertsim.errors import ConfigError, PolicyError

DEFAULT_MODEL = "mixtral-8x7b"
DEFAULT_HARDWARE = "a40"
DEFAULT_POLICIES = ["no-cache", "lru:2", "lru:3", "all-on-gpu"]
# (results column, table header): units in the headers.
TABLE_COLUMNS = [
    ("policy_label", "policy"), ("cache_label", "cache"), ("hit_rate", "hit_rate"), ("tpot_ms", "TPOT_ms"),
    ("tokens_per_s", "tokens_per_s"), ("h2d_gb", "GB_over_link"), ("stall_fraction", "stall_share"),
]
SYSTEM_COLUMNS = [("prefetch_precision", "prefetch_precision"), ("prefetch_recall", "prefetch_recall"),
                  ("dropped_gate_mass", "gate_mass_dropped")]


@dataclass
class CompareReport:
    frame: object  # the polars results table (results.parquet), one row a compared entry
    records: list[dict]
    assumptions: list[str]
    html_path: Path
    parquet_path: Path
    extra_columns: list[tuple[str, str]] = field(default_factory=list)

    @property
    def rows(self) -> list[dict]:
        return self.frame.to_dicts()

    @property
    def failed(self) -> int:
        return sum(1 for r in self.rows if r["status"] != "ok")

    def table_rows(self) -> list[dict]:
        """The printed table: short policy names (parameters only where two rows differ)."""
        from expertsim.analysis.results import short_labels

        cols = TABLE_COLUMNS + self.extra_columns
        if self.failed:
            cols = cols + [("status", "status"), ("error", "error")]
        rows = self.rows
        names = short_labels(rows, cache=False, width=60)
        return [{label: (name if key == "policy_label" else row.get(key)) for key, label in cols}
                for name, row in zip(names, rows)]


def parse_policy(spec: str) -> tuple[str, int | None]:
    """``"lru:3"`` -> ``("lru", 3)``; ``"fiddler"`` -> ``("fiddler", None)``."""
    name, _, k = spec.partition(":")
    if not k:
        return name, None
    try:
        return name, int(k)
    except ValueError:
        raise ConfigError(f"--policy {spec!r}: expected NAME or NAME:K with K slots per layer") from None


def _accepted_params(name: str) -> set[str]:
    """The constructor parameters of a policy or system class (what --param can set)."""
    from expertsim.policies.registry import EVICTION, SYSTEMS, make_policy

    make_policy(name)  # unknown names fail here, with the known ones listed
    cls = SYSTEMS.get(name) or EVICTION[name]
    return {p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")}


def entries(policies: list[str] | None, systems: str | None, params: dict | None = None) -> list[dict]:
    """One study variant per compared entry: ``{"policy": {"name": ..., **params}}`` plus
    ``cache_per_layer`` when the entry gives K. ``params`` go to every entry whose class takes
    them; a parameter that no compared entry takes is an error."""
    from expertsim.policies import system_names

    names: list[tuple[str, int | None]] = []
    if systems:
        # "all": every named system (compose, parts by name, is no system of its own: name it to compare it)
        chosen = [n for n in system_names() if n != "compose"] if systems == "all" else \
            [s.strip() for s in systems.split(",") if s.strip()]
        names += [(name, None) for name in chosen]
    names += [parse_policy(spec) for spec in policies or ([] if systems else DEFAULT_POLICIES)]
    params = params or {}
    accepted = {name: _accepted_params(name) for name, _ in names}
    unused = sorted(set(params) - set().union(*accepted.values()))
    if unused:
        raise PolicyError(f"--param {', '.join(unused)}: no compared policy or system takes "
                          f"{'it' if len(unused) == 1 else 'them'} (`expertsim policies list` shows the parameters)")
    variants = []
    for name, k in names:
        mine = {key: value for key, value in params.items() if key in accepted[name]}
        variant: dict = {"policy": {"name": name, **mine}}
        if k is not None:
            variant["cache_per_layer"] = k
        variants.append(variant)
    return variants


def _decode_window(trace, n: int = 3) -> tuple[int, int]:
    """Iterations [a, b): the first ``n`` decode passes (batch 1), for the report's timeline."""
    from expertsim.sim.workload import iterations_batch1

    its = iterations_batch1(trace)
    first = next((it.index for it in its if it.phase == 1), 0)
    return first, first + n


def _prepare_out(out: Path) -> None:
    """A comparison starts fresh: the run files of an earlier comparison in ``out`` go; a sweep's
    folder is never touched."""
    runs = out / "runs"
    if not runs.is_dir() or not any(runs.iterdir()):
        return
    try:
        kind = json.loads((out / "plan.json").read_text()).get("kind")
    except (OSError, json.JSONDecodeError):
        kind = None
    if kind != "compare":
        raise ConfigError(f"--out {str(out)!r} holds the runs of a sweep, not of a comparison; "
                          f"give another folder (--out)")
    shutil.rmtree(runs)


def compare_study(*, model=None, hardware=None, trace_path=None, policies=None, systems=None,
                  max_tokens=None, requests=None, overrides=None, params=None, options=None):
    """The comparison as a :class:`~expertsim.analysis.study.Study` (one run per entry) and the
    trace it reads. ``overrides``: spec fields (``{"link.bandwidth_gbps": 400}``); ``options``:
    simulator options (``engine``, ``batch``, ``arrival``, ``rate_per_s``, ``seed``,
    ``link_queue``). Bad input fails here, before any run."""
    from expertsim.analysis.study import expand
    from expertsim.analysis.sweep import load_trace
    from expertsim.specs import apply_overrides, load_hardware, load_model

    model, hardware = model or DEFAULT_MODEL, hardware or DEFAULT_HARDWARE
    overrides = dict(overrides or {})
    apply_overrides(load_model(model), load_hardware(hardware), overrides)  # fail before running
    options = {k: v for k, v in (options or {}).items() if v is not None}
    fixed = {"model": model, "hardware": hardware, "trace": trace_path or "default", **overrides, **options}
    if requests is not None:
        fixed["trace_requests"] = int(requests)
    if max_tokens is not None:
        fixed["trace_max_tokens"] = int(max_tokens)
    variants = entries(policies, systems, params)
    study = expand({"name": f"{model} on {hardware}", "fixed": fixed, "variants": variants},
                   name="compare")
    first = study.runs[0]
    trace = load_trace(first["trace_path"], first.get("trace_requests"), "all",
                       first.get("trace_max_tokens"), int(first.get("seed", 0)))
    # The timeline of a few decode passes for the report (the DES records it; --engine fast cannot).
    if options.get("engine") != "fast":
        window = list(_decode_window(trace))
        for run in study.runs:
            run.update(timeline=True, timeline_iterations=window)
    study.kind = "compare"
    source = trace.metadata.get("source", trace_path)
    study.description = (f"Policies side by side on {trace.num_tokens} tokens ({trace.num_requests} requests) "
                         f"of {source}" + (f"; overrides: {', '.join(f'{k}={v}' for k, v in overrides.items())}"
                                           if overrides else ""))
    return study, trace


def run_compare(*, out="expertsim-out", progress: bool = True, stream=None, figure_format: str | None = None,
                jobs: int = 1, **kwargs) -> CompareReport:
    """Run a comparison (the arguments of :func:`compare_study`) into ``out``: the sweep's layout,
    then ``report.html``. ``jobs`` > 1 runs the entries in that many worker processes (the sweep's
    local runner); policies from ``--plugin`` files exist only in this process, so the CLI keeps
    one job for them."""
    from expertsim.analysis.report import assumption_lines, write_report
    from expertsim.analysis.results import load_results
    from expertsim.analysis.sweep import iter_records, run_sweep

    study, trace = compare_study(**kwargs)
    outdir = Path(out)
    _prepare_out(outdir)
    summary = run_sweep(study, outdir, jobs=max(1, min(int(jobs), len(study.runs))), progress=progress,
                        stream=stream)
    frame = load_results(outdir)
    order = {rid: i for i, rid in enumerate(study.run_ids)}
    records = sorted(iter_records(outdir), key=lambda r: order.get(r["run_id"], len(order)))
    common, per_run = assumption_lines(records)
    assumptions = [a for a in common if not a.startswith(("expert cache:", "bounds:"))]
    assumptions.append("expert cache per row (column 'cache'); starts cold, kept warm across requests")
    assumptions.append(f"trace: {trace.metadata.get('source', kwargs.get('trace_path'))} "
                       f"({trace.num_tokens} tokens, {trace.num_requests} requests)")
    assumptions += [a for a in per_run if "bound" in a]
    html_path = write_report(outdir, figure_format=figure_format)
    extra = SYSTEM_COLUMNS if kwargs.get("systems") else []
    return CompareReport(frame=frame, records=records, assumptions=assumptions, html_path=html_path,
                         parquet_path=summary.results_path, extra_columns=extra)
