"""The `expertsim` command. Each area's commands live beside their code; this file assembles them.

Errors that are the user's (bad trace, unknown preset, impossible config) print one clear line
and exit with status 2, never a traceback.
"""
from __future__ import annotations

import sys
from typing import Literal, Optional

import typer

from expertsim.console import echo_json, print_table
from expertsim.errors import ExpertSimError

app = typer.Typer(
    name="expertsim",
    help=(
        "Trace-driven simulator of Mixture-of-Experts inference with expert offloading.\n\n"
        "Routing traces drive a discrete-event model of the PCIe link, GPU memory and compute, "
        "to compare expert caching, prefetching and token-scheduling policies. "
        "Start with `expertsim compare` (a built-in default study)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

specs_app = typer.Typer(help="Model and hardware presets (TOML shipped with expertsim).", no_args_is_help=True)
app.add_typer(specs_app, name="specs")


@specs_app.command("list")
def specs_list(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the model, hardware and runtime presets."""
    from expertsim.specs import list_hardware, list_models, list_runtimes, load_hardware, load_model, load_runtime

    models = [load_model(n).summary() for n in list_models()]
    hardware = [load_hardware(n).summary() for n in list_hardware()]
    runtimes = [load_runtime(n).summary() for n in list_runtimes()]
    if as_json:
        echo_json({"models": models, "hardware": hardware, "runtimes": runtimes})
        return
    typer.echo("Models (expert sizes in the model's dtype; GB = 1e9 bytes):")
    print_table(models)
    typer.echo("\nHardware (link_GBps: effective pinned host-to-device bandwidth):")
    print_table(hardware)
    typer.echo("\nRuntimes (software stacks: exposed host time in us per layer / per expert call, copy semantics):")
    print_table(runtimes)


@specs_app.command("show")
def specs_show(name: str = typer.Argument(..., help="A preset name or a path to a .toml file.")) -> None:
    """Show one preset: every field, with its TOML source (and the comments that cite it)."""
    import dataclasses

    from expertsim.specs import load_hardware, load_model
    from expertsim.specs.loader import _PRESETS

    from expertsim.specs import list_runtimes, load_runtime

    if name in list_runtimes():
        kind = "runtimes"
        spec = load_runtime(name)
    else:
        kind = _spec_kind(name)
        spec = load_hardware(name) if kind == "hardware" else load_model(name)
    typer.echo(f"# {type(spec).__name__} {spec.name}")
    for key, value in dataclasses.asdict(spec).items():
        typer.echo(f"{key} = {value}")
    if kind == "models":
        typer.echo(f"# derived: {spec.summary()}")
    preset = _PRESETS / kind / f"{name}.toml"
    if preset.is_file():
        typer.echo(f"\n# --- preset file {name}.toml ---\n" + preset.read_text())



def _spec_kind(name: str) -> str:
    """"hardware" or "models": a TOML file with a [gpu] or [link] table is hardware; a preset
    name is looked up in both lists; a misspelt name goes to the list it is closest to, so the
    error names the right kind of preset and its close matches."""
    import difflib
    import tomllib
    from pathlib import Path

    from expertsim.errors import SpecError
    from expertsim.specs import list_hardware, list_models

    path = Path(name)
    if name.endswith(".toml") or path.exists():
        if not path.is_file():
            raise SpecError(f"spec file {name!r} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SpecError(f"spec {name!r} is not valid TOML: {exc}") from None
        return "hardware" if {"gpu", "link"} & set(data) else "models"
    if name in list_hardware():
        return "hardware"
    if name in list_models():
        return "models"

    def closeness(names):
        return max((difflib.SequenceMatcher(None, name, n).ratio() for n in names), default=0.0)

    return "hardware" if closeness(list_hardware()) > closeness(list_models()) else "models"


# --- shared option helpers --------------------------------------------------------------------
def _load_trace(path: str | None):
    """The trace at ``path``, or the built-in synthetic default (labelled as such)."""
    if path is None:
        from expertsim.traces.synth import default_trace

        return default_trace()
    from expertsim.traces import read_trace

    return read_trace(path)


def _cache_config(per_layer: int | None, global_slots: int | None, cache_gb: float | None):
    from expertsim.errors import ConfigError, check_option_number
    from expertsim.policies import CacheConfig

    given = [v is not None for v in (per_layer, global_slots, cache_gb)]
    if sum(given) > 1:
        raise ConfigError("give only one of --per-layer, --global-slots, --cache-gb")
    if per_layer is not None:
        return CacheConfig(per_layer=per_layer)
    if global_slots is not None:
        return CacheConfig(global_slots=global_slots)
    if cache_gb is not None:
        check_option_number("--cache-gb", cache_gb, strict=False, high=1e6, unit="GB")
        return CacheConfig(budget_bytes=int(cache_gb * 1e9))
    return None


def _policy_params(items: list[str] | None) -> dict:
    """``["accuracy=0.9", "profile=hot.json"]`` -> ``{"accuracy": 0.9, "profile": "hot.json"}``
    (values parsed as TOML: numbers, booleans, quoted strings; anything else stays a string)."""
    from expertsim.errors import PolicyError

    params = {}
    for item in items or []:
        if "=" not in item:
            raise PolicyError(f"--param {item!r}: expected KEY=VALUE, e.g. --param accuracy=0.9")
        key, value = (part.strip() for part in item.split("=", 1))
        params[key] = _toml_value(value)
    return params


def _toml_value(text: str):
    """``"0.9"`` -> 0.9, ``"true"`` -> True, ``'"x"'`` -> "x"; anything else stays the string."""
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _overrides(sets: list[str] | None) -> dict:
    """``--set KEY=VALUE`` items as spec overrides, values parsed as TOML (numbers stay numbers)."""
    from expertsim.specs import parse_set_options

    return {key: _toml_value(value) for key, value in parse_set_options(sets).items()}


def _run_options(batch: int, rate: float | None, offline: bool, seed: int, engine: str, link_queue: str) -> dict:
    """The simulator options that `simulate` and `compare` share (SimOptions fields)."""
    from expertsim.errors import ConfigError

    if offline and rate is not None:
        raise ConfigError("give --rate R (Poisson arrivals) or --offline (all at t=0), not both")
    return {"batch": batch, "arrival": "offline" if offline else ("poisson" if rate is not None else "closed"),
            "rate_per_s": rate, "seed": seed, "engine": engine, "link_queue": link_queue}


def _window(text: str) -> tuple[int, int]:
    """``"10:14"`` -> ``(10, 14)``: iterations from 10, before 14."""
    from expertsim.errors import ConfigError

    a, sep, b = text.partition(":")
    try:
        window = (int(a), int(b))
    except ValueError:
        window = None
    if not sep or window is None or not 0 <= window[0] < window[1]:
        raise ConfigError(f"--timeline-window {text!r}: give A:B with 0 <= A < B, e.g. 10:14")
    return window


def _policy(policy: str | None, system: str | None, plugins: list[str] | None, params: list[str] | None = None):
    from expertsim.errors import PolicyError
    from expertsim.policies import load_plugin, make_policy, make_system

    for plugin in plugins or []:
        load_plugin(plugin)
    if policy and system:
        raise PolicyError(f"give --policy (an eviction policy) or --system (a named system), not both "
                          f"(got --policy {policy} and --system {system})")
    kwargs = _policy_params(params)
    if system:
        return make_system(system, **kwargs)
    return make_policy(policy or "lru", **kwargs)


PARAM = typer.Option(None, "--param", help="A policy/system parameter KEY=VALUE (repeatable), e.g. --param accuracy=0.9.")


PER_LAYER = typer.Option(None, "--per-layer", min=0, help="Expert cache slots per MoE layer.")
GLOBAL_SLOTS = typer.Option(None, "--global-slots", min=0, help="Expert cache slots in one pool over all layers.")
CACHE_GB = typer.Option(None, "--cache-gb", help="Expert cache as a byte budget in GB (1e9 bytes).")
PLUGIN = typer.Option(None, "--plugin", help="Import a policy plug-in file or module first (repeatable).")
TRACE = typer.Option(None, "--trace", "-t", help="Routing trace (.parquet). Default: the built-in synthetic Mixtral trace. In simulate, 'uniform': uniform top-k routing sized from the model (--prompt-tokens, --decode-tokens).")
SETS = typer.Option(None, "--set", help="Override a spec field, e.g. --set link.bandwidth_gbps=64 (repeatable).")
MAX_TOKENS = typer.Option(None, "--max-tokens", min=1, help="Simulate only the first N tokens (cut at a pass boundary).")
REQUESTS = typer.Option(None, "--requests", min=1, help="Simulate only the first N requests of the trace.")
BATCH = typer.Option(1, "--batch", "-b", min=1, help="Concurrent requests: continuous batching with at most N requests per iteration.")
RATE = typer.Option(None, "--rate", help="Requests arrive at R per second (Poisson, seeded); default: closed loop (a request arrives when one ends).")
OFFLINE = typer.Option(False, "--offline", help="Throughput mode: every request queued at t=0 (MoE-Lightning).")
SEED = typer.Option(0, "--seed", min=0, help="Seed of the Poisson arrivals.")
RUNTIME = typer.Option(None, "--runtime", help="Software stack (`expertsim specs list`): its host and kernel time and copy semantics. Default: a named system's own stack, else 'default' (the roofline alone).")


# Choices as Literal types: --help lists them and the value stays a plain string.
Engine = Literal["auto", "des", "fast"]
LinkQueue = Literal["priority", "fifo"]
Phase = Literal["decode", "prefill", "all"]
Scope = Literal["request", "global"]
Semantics = Literal["together", "standard"]
Partition = Literal["per_layer", "global"]

ENGINE = typer.Option("auto", "--engine", help="des (SimPy reference), fast (the DES's numbers without SimPy: compiled kernels for LRU/FIFO systems with trace-only prefetch, the DES's steps for the rest; one copy engine, no timeline) or auto (fast for built-in systems where it applies).")
LINK_QUEUE = typer.Option("priority", "--link-queue", help="priority (demand copies before queued prefetches; an evicted queued prefetch is dropped) or fifo (issue order, none dropped: one CUDA copy stream, as the real runner).")


@app.command("cache")
def cache_command(
    trace: str = typer.Option(None, "--trace", "-t", help="Routing trace (.parquet); default: built-in synthetic."),
    policy: str = typer.Option(None, "--policy", "-p", help="Eviction policy (default lru)."),
    system: str = typer.Option(None, "--system", help="A named system instead of --policy."),
    per_layer: int = PER_LAYER,
    global_slots: int = GLOBAL_SLOTS,
    cache_gb: float = CACHE_GB,
    model: str = typer.Option(None, "--model", "-m", help="Check the trace against this model (needed for --cache-gb)."),
    phase: Phase = typer.Option("decode", "--phase", help="Tokens to replay: decode, prefill or all."),
    scope: Scope = typer.Option("request", "--scope", help="request: empty the cache at each request; global: keep it."),
    semantics: Semantics = typer.Option("together", "--semantics", help="together (a token's experts resident together) or standard (flattened stream, evict on insert)."),
    engine: Engine = typer.Option("auto", "--engine", help="des|fast|auto: the general LayerServer path or the fast replay (built-in policies)."),
    plugin: list[str] = PLUGIN,
    param: list[str] = PARAM,
    as_json: bool = typer.Option(False, "--json", help='Print {"hit_rate", "hits", "misses", ...} as JSON.'),
) -> None:
    """Replay a trace's expert accesses through the expert cache alone (no timing): hit rate."""
    from expertsim.errors import ConfigError
    from expertsim.sim.cache_replay import replay_cache

    if cache_gb is not None and not model:
        raise ConfigError(f"--cache-gb {cache_gb} needs --model: a byte budget holds as many experts as "
                          f"the model's expert size allows (or give --per-layer / --global-slots)")
    tr = _load_trace(trace)
    sys_obj = _policy(policy, system, plugin, param)
    m = None
    if model:
        from expertsim.specs import load_model

        m = load_model(model)
    result = replay_cache(tr, sys_obj, _cache_config(per_layer, global_slots, cache_gb), model=m,
                          phase=phase, scope=scope, semantics=semantics, engine=engine)
    out = result.to_dict()
    if as_json:
        echo_json(out)
        return
    typer.echo(f"trace: {tr.metadata.get('source', trace)}  policy: {sys_obj.label}  "
               f"phase: {phase}  scope: {scope} (cache {'emptied at each request' if scope == 'request' else 'kept across requests'}, starts cold)  semantics: {semantics}")
    print_table([{"hit_rate": out["hit_rate"], "hits": out["hits"], "misses": out["misses"],
                  "accesses": out["accesses"], "wall_s": out["wall_s"]}])


@app.command("mrc")
def mrc_command(
    trace: str = typer.Option(None, "--trace", "-t", help="Routing trace (.parquet); default: built-in synthetic."),
    partition: Partition = typer.Option("per_layer", "--partition", help="per_layer (K slots per MoE layer) or global (one pool)."),
    phase: Phase = typer.Option("decode", "--phase", help="Tokens to replay: decode, prefill or all."),
    scope: Scope = typer.Option("request", "--scope", help="request: cold at each request; global: kept."),
    semantics: Semantics = typer.Option("together", "--semantics", help="together or standard (see `expertsim cache`)."),
    model: str = typer.Option(None, "--model", "-m", help="Check the trace against this model."),
    as_json: bool = typer.Option(False, "--json", help="Print sizes, hit rates and per-layer hit rates as JSON."),
) -> None:
    """LRU hit rate at every cache size from one pass over the trace (stack distances)."""
    from expertsim.sim.mrc import lru_mrc

    m = None
    if model:
        from expertsim.specs import load_model

        m = load_model(model)
    curve = lru_mrc(_load_trace(trace), partition=partition, phase=phase, scope=scope,
                    semantics=semantics, model=m)
    if as_json:
        echo_json(curve.to_dict())
        return
    typer.echo(f"LRU, {partition} cache, {phase} tokens, cache {'cold at each request' if scope == 'request' else 'kept across requests'}, "
               f"{semantics} semantics; K = slots ({'per MoE layer' if partition == 'per_layer' else 'in the pool'})")
    print_table(curve.rows())


SUMMARY_COLUMNS = ["policy", "cache", "hit_rate", "tpot_ms", "tokens_per_s", "h2d_gb", "stall_fraction"]


def _simulation(model, hardware, trace, policy, system, per_layer, global_slots, cache_gb, sets,
                plugin, options, params=None):
    from expertsim.sim import Simulation
    from expertsim.specs import apply_overrides, load_hardware, load_model

    overrides = _overrides(sets)
    m, h = apply_overrides(load_model(model), load_hardware(hardware), overrides)
    sys_obj = _policy(policy, system, plugin, params)
    from expertsim.sim.cost import runtime_for

    # --runtime (else the system's own) with --set runtime.X=... applied
    options.runtime = runtime_for(sys_obj, options.runtime, overrides)
    return Simulation(m, h, sys_obj, _cache_config(per_layer, global_slots, cache_gb), options=options)


@app.command("simulate")
def simulate_command(
    model: str = typer.Option("mixtral-8x7b", "--model", "-m", help="Model preset or TOML file."),
    hardware: str = typer.Option("a40", "--hardware", "-H", help="Hardware preset or TOML file."),
    trace: str = TRACE,
    policy: str = typer.Option(None, "--policy", "-p", help="Eviction policy (lru, ...) with copy on miss, or a system name."),
    system: str = typer.Option(None, "--system", help="A named system (expertsim policies list)."),
    per_layer: int = PER_LAYER,
    global_slots: int = GLOBAL_SLOTS,
    cache_gb: float = CACHE_GB,
    sets: list[str] = SETS,
    max_tokens: int = MAX_TOKENS,
    timeline: str = typer.Option(None, "--timeline", help="Write the copy/compute timeline: .json or .json.gz (Chrome trace, opens in Perfetto) or .parquet (its columns)."),
    timeline_window: str = typer.Option(None, "--timeline-window", help="Record only iterations A:B (from A, before B) of the timeline, to keep it small, e.g. 10:14."),
    requests: int = REQUESTS,
    batch: int = BATCH,
    rate: float = RATE,
    offline: bool = OFFLINE,
    prefill_chunk: int = typer.Option(None, "--prefill-chunk", min=1, help="Chunked prefill: at most N prompt tokens per request per iteration."),
    copy_chunk_mb: float = typer.Option(None, "--copy-chunk-mb", help="Split expert copies into chunks of this many MB (1e6 bytes); a wrong prefetch is dropped between chunks."),
    profile: str = typer.Option(None, "--profile", help="Calibrated cost tables (JSON from `expertsim calibrate`) instead of the roofline."),
    seed: int = SEED,
    link_queue: LinkQueue = LINK_QUEUE,
    engine: Engine = ENGINE,
    runtime: str = RUNTIME,
    plugin: list[str] = PLUGIN,
    param: list[str] = PARAM,
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", min=0, max=10_000_000, help="With --trace uniform: prompt (prefill) tokens of the request."),
    decode_tokens: int = typer.Option(128, "--decode-tokens", min=0, max=10_000_000, help="With --trace uniform: decode tokens of the request."),
) -> None:
    """Simulate one configuration (model x hardware x policy x cache) on a trace.

    Without a cache size, the system's default: the GPU memory left after dense weights, the KV
    cache and the workspace (systems with a fixed layout use their own)."""
    from expertsim.errors import ConfigError, check_option_number, check_output_path
    from expertsim.sim import SimOptions

    if timeline is not None:
        check_output_path(timeline, "--timeline")
    tr = None if trace == "uniform" else _load_trace(trace)
    run_options = _run_options(batch, rate, offline, seed, engine, link_queue)
    check_option_number("--copy-chunk-mb", copy_chunk_mb, high=1e6, unit="MB")
    check_option_number("--rate", rate, high=1e9, unit="requests/s")
    if timeline is not None:
        from expertsim.sim.metrics import timeline_format

        timeline_format(timeline)  # an unknown suffix fails before the run
    window = _window(timeline_window) if timeline_window else None
    if window is not None and timeline is None:
        raise ConfigError("--timeline-window needs --timeline PATH")
    options = SimOptions(timeline=timeline is not None, timeline_iterations=window, prefill_chunk_tokens=prefill_chunk,
                         copy_chunk_bytes=int(copy_chunk_mb * 1e6) if copy_chunk_mb else None,
                         profile=profile, runtime=runtime, **run_options)
    sim = _simulation(model, hardware, tr, policy, system, per_layer, global_slots, cache_gb, sets,
                      plugin, options, param)
    if tr is None:  # --trace uniform: sized from the model after its --set overrides (top_k)
        from expertsim.traces.synth import uniform_trace

        m = sim.model
        tr = uniform_trace(m.num_moe_layers, m.num_experts, m.top_k, prompt_tokens, decode_tokens,
                           seed=seed, model=m.name)
    if requests:
        tr = tr.head_requests(requests)
    if max_tokens:
        tr = tr.max_tokens(max_tokens)
    result = sim.run(tr, progress=lambda msg: typer.echo(msg, err=True))
    if timeline:
        from expertsim.errors import foreign_errors
        from expertsim.sim.metrics import write_timeline

        with foreign_errors(ConfigError, f"cannot write --timeline {timeline!r}", "choose another path"):
            write_timeline(result.timeline, timeline)
    if as_json:
        echo_json({**result.metrics, "config": result.config, "assumptions": result.assumptions})
        return
    for line in result.assumptions:
        typer.echo(f"# {line}")
    print_table([result.row()], SUMMARY_COLUMNS + ["ttft_ms", "tpot_p99_ms", "hit_rate_decode",
                                                  "hit_rate_prefill"])
    print_table([result.row()], ["batch", "mean_batch", "experts_per_layer_iteration", "e2e_ms",
                                 "peak_gpu_gb", "total_s", "compute_bound_s", "link_bound_s", "wall_s"])
    if timeline:
        typer.echo(f"timeline: {timeline}" + ("" if timeline.lower().endswith(".parquet") else
                                               " (open in https://ui.perfetto.dev or chrome://tracing)"))


@app.command("compare")
def compare_command(
    model: str = typer.Option(None, "--model", "-m", help="Model preset or TOML file (default mixtral-8x7b)."),
    hardware: str = typer.Option(None, "--hardware", "-H", help="Hardware preset or TOML file (default a40)."),
    trace: str = TRACE,
    policies: list[str] = typer.Option(None, "--policy", "-p", help="POLICY[:K] to compare (repeatable); K = slots per layer, default: the system's default cache."),
    systems: str = typer.Option(None, "--systems", help="Comma-separated named systems, or 'all'."),
    sets: list[str] = SETS,
    max_tokens: int = MAX_TOKENS,
    requests: int = REQUESTS,
    batch: int = BATCH,
    rate: float = RATE,
    offline: bool = OFFLINE,
    seed: int = SEED,
    link_queue: LinkQueue = LINK_QUEUE,
    engine: Engine = typer.Option("auto", "--engine", help="auto, des or fast (as simulate). The report's timelines need the DES: with fast there are none."),
    runtime: str = RUNTIME,
    out: str = typer.Option("expertsim-out", "--out", "-o", help="Folder for report.html, results.parquet and runs/ (an earlier comparison there is replaced)."),
    plugin: list[str] = PLUGIN,
    param: list[str] = typer.Option(None, "--param", help="KEY=VALUE for every compared policy/system that takes KEY (repeatable), e.g. --param accuracy=0.9."),
    figure_format: Optional[Literal["svg", "pdf", "png"]] = typer.Option(None, "--format", help="Also write every figure of the report to OUT/figures/ as svg, pdf or png (needs `pip install kaleido`)."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows (results.parquet's columns) as JSON."),
    jobs: int = typer.Option(None, "--jobs", "-j", min=1, help="Entries run in parallel worker processes (default: the CPU count; 1 with --plugin, whose policies exist only in this process)."),
) -> None:
    """Compare policies side by side and write an HTML report. With no arguments: the built-in
    default study (Mixtral-8x7B on an A40, synthetic trace; no cache, LRU 2 and 3, all-on-GPU).
    The folder has the layout of a sweep's: `expertsim results DIR` and `expertsim report DIR` read it."""
    from expertsim.analysis.compare import run_compare
    from expertsim.analysis.report import check_figure_format

    check_figure_format(figure_format)
    if plugin and jobs is not None and jobs > 1:
        from expertsim.errors import ConfigError

        raise ConfigError(f"--jobs {jobs} with --plugin: a plug-in file's policies exist only in this process; "
                          f"drop --jobs (or register them through the expertsim.policies entry point)")
    for p in plugin or []:
        from expertsim.policies import load_plugin

        load_plugin(p)
    import os

    report = run_compare(model=model, hardware=hardware, trace_path=trace, policies=policies,
                         jobs=1 if plugin else (jobs or os.cpu_count() or 1), systems=systems, max_tokens=max_tokens, requests=requests,
                         overrides=_overrides(sets), params=_policy_params(param),
                         options={**_run_options(batch, rate, offline, seed, engine, link_queue), "runtime": runtime},
                         out=out,
                         figure_format=figure_format)
    if as_json:
        echo_json({"rows": report.rows, "assumptions": report.assumptions, "report": str(report.html_path),
                   "results": str(report.parquet_path)})
        return
    for line in report.assumptions:
        typer.echo(f"# {line}")
    print_table(report.table_rows())
    typer.echo(f"\nreport: {report.html_path}\nresults: {report.parquet_path}")


# Command groups that live beside their code (each module imports its heavy dependencies lazily).
from expertsim.traces.commands import trace_app  # noqa: E402

app.add_typer(trace_app, name="trace")

from expertsim.policies.commands import policies_app  # noqa: E402

app.add_typer(policies_app, name="policies")

from expertsim.real_runner.commands import calibrate_command  # noqa: E402

app.command("calibrate")(calibrate_command)

from expertsim.analysis.commands import register as _register_analysis  # noqa: E402
from expertsim.analysis.commands import validate_command  # noqa: E402

app.command("validate")(validate_command)  # the simulator against the real runner (both engines)

_register_analysis(app)  # sweep, results, report


def main() -> None:
    """The console entry point: a user error (ours, or a usage error found by click while it
    parses the options) is one line ``error: ...`` and exit status 2, never a traceback."""
    try:
        code = app(standalone_mode=False)
    except ExpertSimError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except typer.TyperException as exc:  # click's usage errors (typer vendors click)
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group: show its help
            exc.show()
            sys.exit(0)
        message = " ".join(exc.format_message().split())
        cause = exc.__cause__  # typer checks values with pydantic, whose errors hold the input
        if cause is not None and hasattr(cause, "errors"):
            try:
                message += f", got {cause.errors()[0]['input']!r}"
            except (LookupError, TypeError, ValueError):
                pass
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        typer.echo(f"error: {message}{hint}", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
