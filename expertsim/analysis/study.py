"""Study files: a TOML description of a sweep, expanded into one config dict per run.

A study names what stays fixed, what is swept as a grid (Cartesian product), and optional named
variants (a list of scenarios, each crossed with the grid)::

    name = "pcie-vs-cache"               # optional, shown in the report
    description = "What buys more TPOT?"  # optional, shown in the report
    baseline = "no-cache"                # policy the report's summary compares against
                                         # (default: no-cache when swept, else the first policy)

    [fixed]                              # one value for every run
    model = "mixtral-8x7b"
    hardware = "rtx4090"
    trace = "mixtral-8x7b-mtbench.dev.parquet"
    trace_requests = 2
    trace_max_tokens = 200

    [grid]                               # every key a list; runs = the product of all lists
    "link.bandwidth_gbps" = [16, 32, 64] # any spec override (model.*, gpu.*, link.*, cpu.*, storage.*)
    policy = ["lru", { name = "lfu", decay = 0.9 }]   # a name, or a table: name + parameters
    cache_per_layer = [2, 4, 6]
    # An axis of tables sets several keys at once (its name is free):
    # cache = [{ cache_per_layer = "max" }, { cache_slots = "max" }]

    [[variants]]                         # optional named scenarios; a list, not a product
    label = "PCIe 5"
    "link.bandwidth_gbps" = 48
    [[variants]]
    label = "+8 GB"
    "gpu.memory_gb" = 32

    [output]
    timeline = false                     # write runs/<run_id>.timeline.parquet for every run
    timeline_iterations = [0, 4]         # only these iterations [a, b) (keeps files small)

Run keys (in ``[fixed]``, ``[grid]`` or a variant):

- ``model``, ``hardware``: a preset name (``expertsim specs list``) or a path to a TOML spec.
- spec overrides: dotted keys, ``model.dtype``, ``gpu.memory_gb``, ``link.bandwidth_gbps``, ...
  (as ``--set`` on the command line; see ``expertsim.specs.apply_overrides``).
- ``policy``: a policy or system name (``expertsim policies list``), or ``{ name = ..., param = ... }``.
- cache size, at most one of: ``cache_per_layer`` (slots per MoE layer), ``cache_slots`` (one
  global pool of expert slots), ``cache_gb`` (one global pool of GB); each may be ``"max"``: the
  most that fits in GPU memory after dense weights, the KV cache and the workspace. Without one,
  the system's default (as ``expertsim simulate`` without a size: the GPU memory left, in that
  system's layout). Systems that fix their own cache (no-cache, all-on-gpu) ignore it and run
  once per scenario.
- ``engine``: ``"auto"`` (default: the fast replay engine when it supports the run, which gives
  the same metrics, else the SimPy DES), ``"des"`` or ``"fast"``; the engine that ran is the
  ``engine_used`` column.
- ``batch`` (default 1), ``scope`` (``"global"``: the cache stays
  warm across requests, the default; ``"request"``: emptied per request), ``seed`` (default 0).
- ``trace``: a Parquet path (absolute, relative to the study file, or a file name in the shared
  traces folder: ``$EXPERTSIM_SHARED_TRACES`` or ``<repo>/../shared/traces``), or ``"default"``
  (the built-in synthetic Mixtral trace), or ``"uniform"`` (uniform top-k routing per token and
  layer, seeded, sized from the run's model: ``trace_prompt_tokens`` then ``trace_decode_tokens``
  tokens, default 128 each). Slices: ``trace_requests`` (first N requests),
  ``trace_phase`` (``"all"``, ``"decode"``, ``"prefill"``), ``trace_max_tokens`` (first N tokens,
  cut at a pass boundary); applied in that order.
- any other simulator option (a field of ``expertsim.sim.SimOptions``, e.g. ``arrival``,
  ``rate_per_s``, ``prefill_chunk_tokens``, ``copy_chunk_bytes``, ``profile``), passed through.
- ``label``: a free-form scenario name (variants set it).

A run's id is a stable hash of its config (:func:`run_id`), so a resumed sweep recognises the
runs it has already finished.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from expertsim.errors import ConfigError

DEFAULTS: dict[str, Any] = {
    "model": "mixtral-8x7b",
    "hardware": "rtx4090",
    "policy": "lru",
    "policy_params": {},
    "batch": 1,
    "engine": "auto",
    "scope": "global",
    "seed": 0,
    "trace": "default",
    "trace_phase": "all",
    "trace_requests": None,
    "trace_max_tokens": None,
}
CACHE_KEYS = ("cache_per_layer", "cache_slots", "cache_gb")
# The synthetic ``trace = "uniform"`` (uniform top-k routing sized from the run's model) takes its
# lengths from these keys; not in DEFAULTS, so the run ids of other traces do not change.
UNIFORM_TRACE_KEYS = {"trace_prompt_tokens": 128, "trace_decode_tokens": 128}
RUN_KEYS = set(DEFAULTS) | set(CACHE_KEYS) | {"label"} | set(UNIFORM_TRACE_KEYS)
OVERRIDE_PREFIXES = ("model.", "gpu.", "link.", "cpu.", "storage.", "runtime.")
# Keys that change what is recorded, not what is simulated: left out of the run id.
UNHASHED_KEYS = ("trace_path", "timeline", "timeline_iterations")


def is_override(key: str) -> bool:
    return key.startswith(OVERRIDE_PREFIXES)


def run_id(config: dict) -> str:
    """A stable 16-hex-digit hash of the run's config (unhashed bookkeeping keys left out)."""
    hashed = {k: v for k, v in config.items() if k not in UNHASHED_KEYS}
    text = json.dumps(hashed, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def shared_traces_dir() -> Path | None:
    """$EXPERTSIM_SHARED_TRACES, else <repo>/../shared/traces; None when neither exists."""
    env = os.environ.get("EXPERTSIM_SHARED_TRACES")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2].parent / "shared" / "traces")
    for path in candidates:
        if path.is_dir():
            return path
    return None


def resolve_trace(name: str, base_dir: Path | None = None) -> str:
    """The path a ``trace`` value names ("default" stays "default")."""
    if name in ("default", "uniform") or name.startswith("synth:"):
        return name
    path = Path(name).expanduser()
    tried = [path]
    if not path.is_absolute() and base_dir is not None:
        tried.insert(0, base_dir / path)
    shared = shared_traces_dir()
    if shared is not None:
        tried.append(shared / path.name)
    for candidate in tried:
        if candidate.is_file():
            return str(candidate.resolve())
    raise ConfigError(
        f"trace {name!r} not found (tried {', '.join(str(t) for t in tried)}); give a path, a file "
        f"in $EXPERTSIM_SHARED_TRACES, or \"default\" for the built-in synthetic trace"
    )


def _normalise_policy(value: Any) -> tuple[str, dict]:
    if isinstance(value, str):
        return value, {}
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        params = {k: v for k, v in value.items() if k != "name"}
        return value["name"], params
    raise ConfigError(f"policy must be a name or a table {{ name = ..., param = ... }}, got {value!r}")


def sim_option_keys() -> set[str]:
    """The simulator's options (SimOptions fields) a study may set per run, e.g. arrival."""
    import dataclasses

    from expertsim.sim import SimOptions

    return {f.name for f in dataclasses.fields(SimOptions)} - {"timeline", "timeline_iterations"}


def _check_keys(where: str, table: dict) -> None:
    for key in table:
        if key not in RUN_KEYS and key != "policy_params" and not is_override(key):
            options = sim_option_keys()
            if key in options:
                continue
            import difflib

            close = difflib.get_close_matches(key, sorted(RUN_KEYS | options), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"{where}: unknown key {key!r}.{hint} Run keys are {', '.join(sorted(RUN_KEYS))}, a simulator "
                f"option ({', '.join(sorted(options))}) or a spec override starting with "
                f"{', '.join(OVERRIDE_PREFIXES)} (e.g. \"link.bandwidth_gbps\")"
            )


def normalise_config(raw: dict, base_dir: Path | None = None) -> dict:
    """Defaults filled in, policy split into name + params, one cache key, trace located."""
    _check_keys("run", raw)
    config = dict(DEFAULTS)
    config.update({k: v for k, v in raw.items() if k != "policy"})
    if "policy" in raw:
        name, params = _normalise_policy(raw["policy"])
        config["policy"] = name
        config["policy_params"] = {**raw.get("policy_params", {}), **params}
    caches = [k for k in CACHE_KEYS if config.get(k) is not None]
    if len(caches) > 1:
        raise ConfigError(f"a run has more than one cache size ({', '.join(caches)}); give exactly one")
    for key in caches:
        value = config[key]
        if value != "max" and (isinstance(value, bool) or not isinstance(value, (int, float))
                               or not value >= 0 or value == float("inf")):
            raise ConfigError(f"{key} = {value!r}: give a finite non-negative number or \"max\"")
    if not isinstance(config["batch"], int) or config["batch"] < 1:
        raise ConfigError(f"batch = {config['batch']!r}: give an integer >= 1")
    if config["engine"] not in ("auto", "des", "fast"):
        raise ConfigError(f"engine = {config['engine']!r}: give auto, des or fast")
    if config["trace_phase"] not in ("all", "decode", "prefill"):
        raise ConfigError(f"trace_phase = {config['trace_phase']!r}: give all, decode or prefill")
    config["trace_path"] = resolve_trace(str(config["trace"]), base_dir)
    if config["trace_path"] == "uniform":
        for key, default in UNIFORM_TRACE_KEYS.items():
            value = config.setdefault(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10_000_000:
                raise ConfigError(f"{key} = {value!r}: give an integer number of tokens in 0..10000000")
        if config["trace_prompt_tokens"] + config["trace_decode_tokens"] < 1:
            raise ConfigError("trace = \"uniform\" needs at least one token: set trace_prompt_tokens or "
                              "trace_decode_tokens >= 1")
    else:
        given = [k for k in UNIFORM_TRACE_KEYS if k in config]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply to trace = \"uniform\" (this run's trace is "
                              f"{config['trace']!r}); remove them or use the uniform trace")
    # A trace given by path is identified by its file name in the run id, so a study moved with
    # its traces keeps its ids; the resolved path travels as trace_path.
    if config["trace_path"] not in ("default",) and not config["trace"].startswith("synth:"):
        config["trace"] = Path(config["trace"]).name
    return config


@dataclass
class Study:
    """A parsed study file: its name, its runs' configs, the output options."""

    name: str
    runs: list[dict]
    description: str = ""
    baseline: str | None = None
    output: dict = field(default_factory=dict)
    source_text: str = ""
    path: str = ""
    swept_keys: list[str] = field(default_factory=list)
    kind: str = "sweep"  # "sweep" (a study file) or "compare" (`expertsim compare`)

    @property
    def run_ids(self) -> list[str]:
        return [c["run_id"] for c in self.runs]

    def __len__(self) -> int:
        return len(self.runs)


def _fixed_cache_policies(configs: list[dict]) -> set[str]:
    """Policies whose system dictates its own cache (they ignore the swept cache size)."""
    from expertsim.policies import make_policy
    from expertsim.specs import load_model

    fixed = set()
    for name, params, model in {(c["policy"], json.dumps(c["policy_params"], sort_keys=True), c["model"])
                                for c in configs}:
        system = make_policy(name, **json.loads(params))
        if system.cache_config(load_model(model)) is not None:
            fixed.add(name)
    return fixed


def _check_specs(configs: list[dict]) -> None:
    """Every run's model, hardware and spec overrides, loaded once per distinct combination at
    plan time: a misspelt override key (with a did-you-mean) or an out-of-range number (a zero
    bandwidth) stops the sweep before it starts, instead of failing every run."""
    from expertsim.errors import ExpertSimError
    from expertsim.specs import apply_overrides, load_hardware, load_model

    seen: set[str] = set()
    for config in configs:
        overrides = {k: v for k, v in config.items() if is_override(k)}
        key = json.dumps([config["model"], config["hardware"], config.get("runtime"), overrides], sort_keys=True,
                         default=str)
        if key in seen:
            continue
        seen.add(key)
        try:
            apply_overrides(load_model(config["model"]), load_hardware(config["hardware"]), overrides)
            from expertsim.sim.cost import runtime_for

            # the runtime's name, and its runtime.* keys against the runtime's fields (without a
            # system here: a named system's own runtime has the same fields as "default")
            if config.get("runtime") is not None or any(k.startswith("runtime.") for k in overrides):
                runtime_for(None, config.get("runtime"), overrides)
        except ExpertSimError as exc:
            label = f" (scenario {config['label']!r})" if config.get("label") else ""
            raise ConfigError(f"study run{label} with model {config['model']!r}, hardware "
                              f"{config['hardware']!r}: {exc}") from None


def expand(data: dict, *, base_dir: Path | None = None, name: str = "study") -> Study:
    """The runs of a study given as a dict (a parsed TOML file)."""
    known = {"name", "description", "baseline", "fixed", "grid", "variants", "output"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"study: unknown top-level key(s) {unknown}; known: {sorted(known)}")
    fixed = dict(data.get("fixed", {}))
    grid = dict(data.get("grid", {}))
    variants = list(data.get("variants", [])) or [{}]
    _check_keys("[fixed]", fixed)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"[grid] {key} must be a non-empty list, got {values!r}; "
                              f"put single values in [fixed]")
    # An axis of tables (other than policy) sets several run keys at once, e.g.
    # cache = [{ cache_per_layer = "max" }, { cache_slots = "max" }]; its name is free.
    table_axes = {k for k, v in grid.items() if k != "policy" and all(isinstance(x, dict) for x in v)}
    _check_keys("[grid]", {k: v for k, v in grid.items() if k not in table_axes})
    for key in table_axes:
        for table in grid[key]:
            _check_keys(f"[grid] {key}", table)
    for i, variant in enumerate(variants):
        if not isinstance(variant, dict):
            raise ConfigError(f"[[variants]] #{i + 1} must be a table")
        _check_keys(f"[[variants]] #{i + 1}", variant)
    output = dict(data.get("output", {}))
    unknown_out = sorted(set(output) - {"timeline", "timeline_iterations"})
    if unknown_out:
        raise ConfigError(f"[output]: unknown key(s) {unknown_out}; known: timeline, timeline_iterations")

    keys = list(grid)
    configs: list[dict] = []
    seen: set[str] = set()
    for variant in variants:
        for combo in itertools.product(*(grid[k] for k in keys)):
            raw = dict(fixed)
            for key, value in zip(keys, combo):
                if key in table_axes:
                    raw.update(value)
                else:
                    raw[key] = value
            raw.update(variant)
            configs.append(normalise_config(raw, base_dir))
    _check_specs(configs)
    fixed_cache = _fixed_cache_policies(configs)
    runs = []
    for config in configs:
        if config["policy"] in fixed_cache:
            for key in CACHE_KEYS:
                config.pop(key, None)
        config = {k: v for k, v in config.items() if v is not None}
        if output.get("timeline"):
            config["timeline"] = True
            if output.get("timeline_iterations") is not None:
                config["timeline_iterations"] = list(output["timeline_iterations"])
        rid = run_id(config)
        if rid in seen:  # e.g. no-cache once per scenario, whatever the swept cache sizes
            continue
        seen.add(rid)
        runs.append({"run_id": rid, **config})
    swept = sorted({k for k in keys if k not in table_axes} | {k for a in table_axes for t in grid[a] for k in t}
                   | {k for v in variants for k in v})
    policies = [c["policy"] for c in runs]
    baseline = data.get("baseline") or ("no-cache" if "no-cache" in policies else (policies[0] if policies else None))
    return Study(name=str(data.get("name", name)), runs=runs, description=str(data.get("description", "")),
                 baseline=baseline, output=output, swept_keys=swept)


def load_study(path: str | Path) -> Study:
    """Read and expand a study TOML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {str(path)!r} does not exist")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ConfigError(f"study {str(path)!r} is not a text file (it is not UTF-8); give a study "
                          f"TOML such as examples/mixtral_sweep_200.toml") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"study {str(path)!r} is not valid TOML: {exc}") from None
    try:
        study = expand(data, base_dir=path.resolve().parent, name=path.stem)
    except ConfigError as exc:
        raise ConfigError(f"study {str(path)!r}: {exc}") from None
    study.source_text = text
    study.path = str(path)
    return study
