"""Sweeps: run a study's configs in parallel (local processes or Ray), one result file a run.

``run_one(config)`` is the single place that turns a run's config dict into specs, a policy and a
cache and calls the simulator; every backend calls it. Each finished run is written atomically to
``DIR/runs/<run_id>.json`` (a temporary file, then ``os.replace``), so an interrupted sweep resumes
by skipping the run ids already on disk; a failing run is a result with ``status = "error"`` and
its message, and the sweep goes on. ``DIR/results.parquet`` is rebuilt from the run files.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from expertsim.analysis.runs import (  # noqa: F401  (iter_records, read_run, ...: re-exported)
    RUNS_DIR,
    _json_default,
    atomic_write_bytes,
    clean_stale_tmp,
    finished_run_ids,
    iter_records,
    read_run,
    torn_run_files,
    write_run,
)
from expertsim.analysis.study import CACHE_KEYS, Study, is_override


# --- one run -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=4)
def _read_full_trace(path: str, seed: int):
    if path == "default":
        from expertsim.traces.synth import default_trace

        return default_trace(seed=seed)
    from expertsim.traces.io import read_trace

    return read_trace(path)


@functools.lru_cache(maxsize=16)
def load_trace(path: str, requests: int | None, phase: str, max_tokens: int | None, seed: int = 0):
    """A trace sliced as a study asks (first requests, one phase, first tokens); cached per process."""
    trace = _read_full_trace(path, seed)
    if requests is not None:
        trace = trace.head_requests(int(requests))
    trace = trace.only_phase(phase)
    if max_tokens is not None:
        trace = trace.max_tokens(int(max_tokens))
    if trace.num_tokens == 0:
        from expertsim.errors import ConfigError

        raise ConfigError(f"trace slice of {path} is empty (requests={requests}, phase={phase}, "
                          f"max_tokens={max_tokens})")
    return trace


@functools.lru_cache(maxsize=4)
def _uniform_trace(layers: int, experts: int, top_k: int, prompt: int, decode: int, seed: int, model: str):
    from expertsim.traces.synth import uniform_trace

    return uniform_trace(layers, experts, top_k, prompt, decode, seed=seed, model=model)


def trace_for(config: dict, model):
    """The trace a run's config names, sliced as it asks; ``trace = "uniform"`` is generated for
    ``model`` (after its overrides: ``model.top_k`` changes the routing)."""
    trace_path = config.get("trace_path", config.get("trace", "default"))
    if trace_path == "uniform":
        trace = _uniform_trace(model.num_moe_layers, model.num_experts, model.top_k,
                               int(config.get("trace_prompt_tokens", 128)), int(config.get("trace_decode_tokens", 128)),
                               int(config.get("seed", 0)), model.name)
        if config.get("trace_max_tokens") is not None:
            trace = trace.max_tokens(int(config["trace_max_tokens"]))
        return trace.only_phase(config.get("trace_phase", "all"))
    return load_trace(trace_path, config.get("trace_requests"), config.get("trace_phase", "all"),
                      config.get("trace_max_tokens"), int(config.get("seed", 0)))


def _cache_config(config: dict, model, hardware, trace, system):
    """The CacheConfig a run asks for; "max" = the most that fits next to dense weights + KV;
    None when the system fixes its own or no size is given (the system's default)."""
    from expertsim.errors import ConfigError
    from expertsim.policies import CacheConfig

    if system.cache_config(model) is not None:
        return None  # the system fixes its own
    key = next((k for k in CACHE_KEYS if config.get(k) is not None), None)
    if key is None:
        return None  # the system's default, sized by the simulation from the trace (as `simulate`)
    value = config[key]
    if value == "max":
        context = int(trace.position.max()) + 1
        free = (hardware.gpu.memory_bytes - model.dense_bytes - int(round(model.kv_bytes_per_token_stored * context))
                - int(hardware.gpu.workspace_gb * 1e9))
        if free <= 0:
            raise ConfigError(f"no GPU memory left for an expert cache on {hardware.name} "
                              f"({hardware.gpu.memory_gb} GB) after dense weights, KV and workspace")
        slots = free // model.expert_bytes()
        if key == "cache_per_layer":
            return CacheConfig(per_layer=int(slots // model.num_moe_layers))
        if key == "cache_slots":
            return CacheConfig(global_slots=int(slots))
        return CacheConfig(budget_bytes=int(free))
    if key == "cache_per_layer":
        return CacheConfig(per_layer=int(value))
    if key == "cache_slots":
        return CacheConfig(global_slots=int(value))
    return CacheConfig(budget_bytes=int(round(float(value) * 1e9)))


def _sim_options(config: dict):
    """SimOptions for the run; batch/engine are passed when this simulator has those options."""
    from expertsim.errors import ConfigError
    from expertsim.sim import SimOptions

    names = {f.name for f in dataclasses.fields(SimOptions)}
    kwargs: dict = {"scope": config.get("scope", "global"), "timeline": bool(config.get("timeline"))}
    if config.get("timeline_iterations") is not None:
        a, b = config["timeline_iterations"]
        kwargs["timeline_iterations"] = (int(a), int(b))
    for key in names - {"scope", "timeline", "timeline_iterations", "batch", "engine"}:
        if config.get(key) is not None:
            value = config[key]
            kwargs[key] = tuple(value) if isinstance(value, list) else value
    value = config.get("batch", 1)
    if "batch" in names:
        kwargs["batch"] = value
    elif value != 1:
        raise ConfigError(f"batch = {value!r}: this expertsim's simulator has no batching yet (only batch = 1)")
    if "engine" in names:
        kwargs["engine"] = config.get("engine", "auto")
    return SimOptions(**kwargs)


def _simulate(config: dict, model, hardware, system, cache, options, trace, progress=None):
    """Run the config. ``Simulation.run`` picks the engine by ``options.engine``: "des" (SimPy,
    any policy, timelines), "fast" (the replay engine, built-in policies; exactly the same
    metrics) or "auto" (fast when it supports the run, else des)."""
    from expertsim.sim import Simulation

    return Simulation(model, hardware, system, cache, options).run(trace, progress=progress)


def run_one(config: dict, progress: Callable[[str], None] | None = None) -> dict:
    """Simulate one config; never raises. Returns a JSON-friendly record: run_id, status
    ("ok"/"error"), error, config, metrics, assumptions, provenance, wall_s, and the timeline
    columns when the config asks for them. ``progress``: the DES's status lines (in-process runs)."""
    t0 = time.perf_counter()
    record: dict = {"run_id": config.get("run_id"), "status": "ok", "error": None,
                    "config": {k: v for k, v in config.items() if k != "run_id"},
                    "metrics": {}, "assumptions": [], "provenance": {}}
    try:
        import expertsim
        from expertsim.policies import make_policy
        from expertsim.specs import apply_overrides, load_hardware, load_model

        model = load_model(config["model"])
        hardware = load_hardware(config["hardware"])
        overrides = {k: v for k, v in config.items() if is_override(k)}
        model, hardware = apply_overrides(model, hardware, overrides)
        trace_path = config.get("trace_path", config.get("trace", "default"))
        trace = trace_for(config, model)
        trace = dataclasses.replace(trace)  # check_model mutates; keep the cached one pristine
        system = make_policy(config["policy"], **config.get("policy_params", {}))
        cache = _cache_config(config, model, hardware, trace, system)
        record["provenance"] = {
            "expertsim_version": expertsim.__version__,
            "trace_sha256": None if trace_path in ("default", "uniform") else file_sha256(trace_path),
            "trace_tokens": trace.num_tokens,
            "trace_requests": trace.num_requests,
            "model_spec": dataclasses.asdict(model),
            "hardware_spec": dataclasses.asdict(hardware),
            "cache_config": None if cache is None else cache.describe(),
            "python": sys.version.split()[0],
        }
        options = _sim_options(config)
        from expertsim.sim.cost import runtime_for

        options.runtime = runtime_for(system, options.runtime, overrides)  # with its runtime.* keys
        result = _simulate(config, model, hardware, system, cache, options, trace, progress)
        metrics = dict(result.metrics)
        m = model
        metrics["cache_experts"] = int(round(metrics["expert_cache_gb"] * 1e9 / m.expert_bytes()))
        metrics["cache_per_layer_equiv"] = metrics["cache_experts"] / m.num_moe_layers
        record["metrics"] = metrics
        record["policy_label"] = result.config.get("policy")
        record["cache_label"] = result.config.get("cache")
        record["engine_used"] = result.config.get("engine")
        record["runtime_label"] = result.config.get("runtime")
        record["assumptions"] = list(result.assumptions)
        if result.timeline is not None:
            record["timeline"] = result.timeline.to_dict()
    except Exception as exc:  # noqa: BLE001 - a failing run is a result, the sweep goes on
        record["status"] = "error"
        record["error"] = f"{type(exc).__name__}: {exc}"
        from expertsim.errors import ExpertSimError

        if not isinstance(exc, ExpertSimError):
            record["traceback"] = traceback.format_exc(limit=8)
    record["wall_s"] = time.perf_counter() - t0
    return record


# --- progress ------------------------------------------------------------------------------
class Progress:
    """Progress of a sweep on stderr with rich: done/total, errors, runs per minute, elapsed,
    ETA, and the run in progress (with the DES's status line when runs are in this process).
    On a terminal a live bar; elsewhere (a log file, CI) one line at most every
    ``min_interval_s`` and at the end."""

    def __init__(self, total: int, already: int = 0, stream=None, min_interval_s: float = 1.0,
                 errors: int = 0):
        from rich.console import Console
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.total, self.done, self.errors = total, already, errors
        self.started_with = already
        self.t0 = time.monotonic()
        self.last = 0.0
        self.min_interval_s = min_interval_s
        self.console = Console(file=stream or sys.stderr, highlight=False, soft_wrap=True)
        self.live = self.console.is_terminal
        if not self.live:
            self.console.width = 200  # a log line, not a screen: do not cut the columns
        self._progress = RichProgress(
            BarColumn(bar_width=24),
            TextColumn("{task.completed}/{task.total} runs, {task.fields[errors]} errors, "
                       "{task.fields[rate]:.1f} runs/min, elapsed"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            TextColumn("{task.description}"),
            console=self.console, auto_refresh=self.live, transient=False)
        self._task = self._progress.add_task("", total=total, completed=already, errors=errors, rate=0.0)
        if self.live:
            self._progress.start()

    def _refresh(self, force: bool = False) -> None:
        self._progress.update(self._task, completed=self.done, errors=self.errors, rate=self.runs_per_minute)
        now = time.monotonic()
        if not self.live and (force or now - self.last >= self.min_interval_s):
            self.last = now
            self.console.print(self._progress.make_tasks_table(self._progress.tasks))

    def start_run(self, name: str) -> None:
        """The run that starts now (shown beside the bar)."""
        self._progress.update(self._task, description=name)

    def status(self, line: str) -> None:
        """A status line of the run in progress (the DES's tokens done)."""
        description = self._progress.tasks[0].description.split(": ")[0]
        self._progress.update(self._task, description=f"{description}: {line}")
        self._refresh()

    def update(self, status: str) -> None:
        self.done += 1
        if status != "ok":
            self.errors += 1
        self._refresh(force=self.done == self.total)
        self._progress.update(self._task, description="")

    def close(self) -> None:
        if self.live:
            self._refresh()
            self._progress.stop()

    @property
    def runs_per_minute(self) -> float:
        elapsed = time.monotonic() - self.t0
        return (self.done - self.started_with) / elapsed * 60 if elapsed > 0 else 0.0


def run_name(config: dict) -> str:
    """A short name of a run for progress lines: its label or policy, and its cache size."""
    cache = next((f"{k}={config[k]}" for k in CACHE_KEYS if config.get(k) is not None), None)
    return " ".join(str(x) for x in (config.get("label"), config.get("policy"), cache) if x is not None)


# --- backends ------------------------------------------------------------------------------
def _local(configs: list[dict], jobs: int, on_result: Callable[[dict], None], bar: Progress | None = None) -> None:
    if jobs <= 1:
        for config in configs:
            if bar is not None:
                bar.start_run(run_name(config))
            on_result(run_one(config, progress=bar.status if bar is not None else None))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    # Spawn: no forked copies of the parent's threads or locks (polars, Ray); safe everywhere.
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(run_one, config): config for config in configs}
        for future in as_completed(futures):
            try:
                record = future.result()
            except BrokenProcessPool as exc:  # a worker died (out of memory, killed)
                config = futures[future]
                record = {"run_id": config["run_id"], "status": "error",
                          "error": f"worker process died: {exc}", "config": config, "metrics": {}}
            on_result(record)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _ray(configs: list[dict], jobs: int | None, address: str | None, on_result: Callable[[dict], None]) -> None:
    try:
        import ray
    except ImportError:
        from expertsim.errors import ConfigError

        raise ConfigError("--backend ray needs Ray: pip install 'expertsim[ray]'") from None
    started_here = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        kwargs = {"address": address} if address else {"num_cpus": jobs or os.cpu_count()}
        ray.init(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True, **kwargs)
        started_here = True
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(run_one)
        pending = {remote.remote(config): config for config in configs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                config = pending.pop(ref)
                try:
                    record = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a lost worker is a failed run
                    record = {"run_id": config["run_id"], "status": "error",
                              "error": f"ray task failed: {type(exc).__name__}: {exc}",
                              "config": config, "metrics": {}}
                on_result(record)
    finally:
        if started_here:  # on a cluster this only disconnects the driver
            ray.shutdown()


@dataclasses.dataclass
class SweepSummary:
    total: int
    skipped: int
    ran: int
    errors: int
    wall_s: float
    results_path: Path

    @property
    def runs_per_minute(self) -> float:
        return self.ran / self.wall_s * 60 if self.wall_s > 0 else 0.0


def plan(study: Study, out_dir: Path | None = None, *, retry_errors: bool = False) -> tuple[list[dict], int]:
    """The configs still to run, and how many are already finished in ``out_dir``."""
    done = finished_run_ids(out_dir, include_errors=not retry_errors) if out_dir else set()
    todo = [c for c in study.runs if c["run_id"] not in done]
    return todo, len(study.runs) - len(todo)


def run_sweep(study: Study, out_dir: str | Path, *, backend: str = "local", jobs: int | None = None,
              address: str | None = None, retry_errors: bool = False, progress: bool = True,
              stream=None) -> SweepSummary:
    """Run every config of ``study`` not yet finished in ``out_dir``, writing each as it finishes."""
    from expertsim.analysis.results import write_results
    from expertsim.errors import ConfigError

    out = Path(out_dir)
    (out / RUNS_DIR).mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(out)
    planned = set(study.run_ids)
    for path in torn_run_files(out):
        if path.stem in planned:
            (stream or sys.stderr).write(f"warning: {path} is torn or unreadable; running {path.stem} again\n")
    _write_study_files(study, out)
    todo, skipped = plan(study, out, retry_errors=retry_errors)
    jobs = jobs or os.cpu_count() or 1
    prior_errors = len((finished_run_ids(out) - finished_run_ids(out, include_errors=False))
                       & (set(study.run_ids) - {c["run_id"] for c in todo})) if skipped else 0
    bar = Progress(len(study.runs), already=skipped, stream=stream, errors=prior_errors) if progress else None
    errors = 0
    t0 = time.monotonic()

    def on_result(record: dict) -> None:
        nonlocal errors
        write_run(out, record)
        if record["status"] != "ok":
            errors += 1
        if bar is not None:
            bar.update(record["status"])

    try:
        if backend == "local":
            _local(todo, jobs, on_result, bar)
        elif backend == "ray":
            _ray(todo, jobs, address, on_result)
        else:
            raise ConfigError(f"--backend must be local or ray, got {backend!r}")
    finally:
        if bar is not None:
            bar.close()
        path = write_results(out)
    return SweepSummary(total=len(study.runs), skipped=skipped, ran=len(todo), errors=errors,
                        wall_s=time.monotonic() - t0, results_path=path)


def _write_study_files(study: Study, out: Path) -> None:
    """DIR/study.toml (the file as given) and DIR/plan.json (every run's config), for the report."""
    if study.source_text:
        atomic_write_bytes(out / "study.toml", study.source_text.encode())
    meta = {"kind": study.kind, "name": study.name, "description": study.description, "baseline": study.baseline,
            "swept_keys": study.swept_keys, "output": study.output, "runs": study.runs}
    atomic_write_bytes(out / "plan.json", json.dumps(meta, default=_json_default, indent=1).encode())
