"""Load specs from the TOML presets shipped in the package, or from a user's own TOML file."""
from __future__ import annotations

import dataclasses
import difflib
import math
import sys
from importlib import resources
from pathlib import Path
from typing import Any


from expertsim.errors import SpecError
from expertsim.specs.hardware import CpuSpec, GpuSpec, HardwareSpec, LinkSpec, StorageSpec
from expertsim.specs.model import ModelSpec
from expertsim.specs.runtime import RuntimeSpec

_PRESETS = resources.files("expertsim.specs") / "presets"


def _toml():
    """tomllib (3.11+) or tomli, imported when a TOML is read: the real runner imports specs on
    GPU machines that may have neither."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib


def _preset_names(kind: str) -> list[str]:
    folder = _PRESETS / kind
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def list_models() -> list[str]:
    return _preset_names("models")


def list_hardware() -> list[str]:
    return _preset_names("hardware")


def list_runtimes() -> list[str]:
    return _preset_names("runtimes")


def _read_toml(name_or_path: str | Path, kind: str) -> tuple[dict, str]:
    text_name = str(name_or_path)
    path = Path(text_name)
    if text_name.endswith(".toml") or path.exists():
        if not path.is_file():
            raise SpecError(f"{kind} spec file {text_name!r} does not exist")
        source = str(path)
        raw = path.read_bytes()
    else:
        names = _preset_names(kind)
        if text_name not in names:
            close = difflib.get_close_matches(text_name, names, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise SpecError(
                f"unknown {kind[:-1] if kind.endswith('s') else kind} preset {text_name!r}.{hint} "
                f"Known: {', '.join(names)} (or pass a path to your own .toml; "
                f"`expertsim specs list` shows them)"
            )
        source = f"preset:{text_name}"
        raw = (_PRESETS / kind / f"{text_name}.toml").read_bytes()
    tomllib = _toml()
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"{kind} spec {text_name!r} is not valid TOML: {exc}") from None
    return data, source


def _moe_layers(data: dict, num_layers: int) -> tuple[int, ...]:
    spec = data.pop("moe_layers", "all")
    layout = {}
    for key, default, low in (("first_dense_layers", 0, 0), ("moe_layer_step", 1, 1), ("moe_layer_offset", 0, 0)):
        value = data.pop(key, default)
        if not isinstance(value, int) or value < low:
            raise SpecError(f"model {data.get('name')!r}: {key} must be an integer >= {low}, got {value!r}")
        layout[key] = value
    first_dense, step, offset = layout["first_dense_layers"], layout["moe_layer_step"], layout["moe_layer_offset"]
    if isinstance(spec, list):
        if (first_dense, step, offset) != (0, 1, 0):
            raise SpecError(
                f"model {data.get('name')!r}: give either an explicit moe_layers list or "
                f"first_dense_layers/moe_layer_step/moe_layer_offset, not both"
            )
        if not all(isinstance(x, int) for x in spec):
            raise SpecError(f"model {data.get('name')!r}: moe_layers must list integer layer indices, got {spec!r}")
        return tuple(spec)
    if spec != "all":
        raise SpecError(f"moe_layers must be 'all' or a list of layer indices, got {spec!r}")
    return tuple(i for i in range(first_dense, num_layers) if (i - offset) % step == 0 and i >= offset)


def model_from_dict(data: dict, name: str = "custom") -> ModelSpec:
    data = dict(data)
    data.setdefault("name", name)
    num_layers = data.get("num_layers")
    if not isinstance(num_layers, int):
        raise SpecError(f"model {data['name']!r}: num_layers must be an integer, got {num_layers!r}")
    data["moe_layers"] = _moe_layers(data, num_layers)
    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise SpecError(f"model {data['name']!r}: unknown field(s) {unknown}; known: {sorted(fields)}")
    try:
        return check_model_numbers(ModelSpec(**data))
    except TypeError as exc:
        raise SpecError(f"model {data['name']!r}: {exc}") from None


def hardware_from_dict(data: dict, name: str = "custom") -> HardwareSpec:
    data = dict(data)
    parts: dict[str, Any] = {}
    for key, cls in (("gpu", GpuSpec), ("link", LinkSpec), ("cpu", CpuSpec), ("storage", StorageSpec)):
        section = data.pop(key, None)
        if section is None:
            if key == "storage":
                continue
            raise SpecError(f"hardware {data.get('name', name)!r}: missing [{key}] table")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - fields)
        if unknown:
            raise SpecError(f"hardware [{key}]: unknown field(s) {unknown}; known: {sorted(fields)}")
        try:
            parts[key] = cls(**section)
        except TypeError as exc:
            raise SpecError(f"hardware {data.get('name', name)!r} [{key}]: {exc}") from None
    data.setdefault("name", name)
    unknown = sorted(set(data) - {"name", "source"})
    if unknown:
        raise SpecError(f"hardware {data['name']!r}: unknown top-level field(s) {unknown}")
    return check_hardware_numbers(HardwareSpec(**data, **parts))


def load_model(name_or_path: str | Path) -> ModelSpec:
    """A model preset by name (``mixtral-8x7b``) or a path to a TOML file."""
    if isinstance(name_or_path, ModelSpec):
        return name_or_path
    data, source = _read_toml(name_or_path, "models")
    spec = model_from_dict(data, name=Path(str(name_or_path)).stem)
    return spec


def load_hardware(name_or_path: str | Path) -> HardwareSpec:
    """A hardware preset by name (``a100-80gb-pcie``) or a path to a TOML file."""
    if isinstance(name_or_path, HardwareSpec):
        return name_or_path
    data, _ = _read_toml(name_or_path, "hardware")
    return hardware_from_dict(data, name=Path(str(name_or_path)).stem)


def runtime_from_dict(data: dict, name: str = "custom") -> RuntimeSpec:
    data = dict(data)
    data.setdefault("name", name)
    fields = {f.name for f in dataclasses.fields(RuntimeSpec)}
    unknown = sorted(set(data) - fields)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(fields), n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise SpecError(f"runtime {data['name']!r}: unknown field(s) {unknown}.{hint} Known: {sorted(fields)}")
    try:
        return RuntimeSpec(**data)
    except TypeError as exc:
        raise SpecError(f"runtime {data['name']!r}: {exc}") from None


def load_runtime(name_or_path: str | Path | RuntimeSpec) -> RuntimeSpec:
    """A runtime preset by name (``mixtral-offloading``) or a path to a TOML file."""
    if isinstance(name_or_path, RuntimeSpec):
        return name_or_path
    data, _ = _read_toml(name_or_path, "runtimes")
    return runtime_from_dict(data, name=Path(str(name_or_path)).stem)


def apply_runtime_overrides(runtime: RuntimeSpec, overrides: dict[str, Any]) -> RuntimeSpec:
    """Apply the ``runtime.``-prefixed keys of ``overrides`` (others are ignored)."""
    for key, value in overrides.items():
        parts = key.split(".")
        if parts[0] != "runtime":
            continue
        if len(parts) != 2:
            raise SpecError(f"--set {key}: name a runtime field, e.g. runtime.host_us_per_layer=500")
        runtime = _set_path(runtime, parts[1:], value, key)
    return runtime


def _coerce(value: Any, current: Any, key: str) -> Any:
    if isinstance(current, dict):
        example = next(iter(current), "bf16")
        raise SpecError(f"--set {key}: {key} is a table; set one entry, e.g. --set {key}.{example}=VALUE")
    if isinstance(value, str) and not isinstance(current, str):
        tomllib = _toml()
        try:
            value = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            raise SpecError(f"--set {key}={value!r}: not a number or TOML value") from None
    if isinstance(current, bool) and not isinstance(value, bool):
        raise SpecError(f"--set {key}: expected true/false, got {value!r}")
    if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float):
        if not value.is_integer():
            raise SpecError(f"--set {key}: expected an integer, got {value!r}")
        value = int(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if current is None and isinstance(value, str) and value in ("true", "false"):
        value = value == "true"
    return value


def _set_path(obj: Any, path: list[str], value: Any, key: str) -> Any:
    head, rest = path[0], path[1:]
    if isinstance(obj, dict):
        if rest:
            raise SpecError(f"--set {key}: cannot descend into {head!r}")
        new = dict(obj)
        new[head] = _coerce(value, obj.get(head, 0.0), key)
        return new
    names = {f.name for f in dataclasses.fields(obj)}
    if head not in names:
        close = difflib.get_close_matches(head, sorted(names), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise SpecError(f"--set {key}: {type(obj).__name__} has no field {head!r}.{hint}")
    current = getattr(obj, head)
    new_value = _set_path(current, rest, value, key) if rest else _coerce(value, current, key)
    try:
        return dataclasses.replace(obj, **{head: new_value})
    except (TypeError, AttributeError, ValueError) as exc:
        if isinstance(exc, SpecError):
            raise
        raise SpecError(f"--set {key}={value!r}: not a valid value for {type(obj).__name__}.{head} "
                        f"({type(exc).__name__}: {exc})") from None


def apply_overrides(model: ModelSpec, hardware: HardwareSpec, overrides: dict[str, Any]) -> tuple[ModelSpec, HardwareSpec]:
    """Apply ``{"link.bandwidth_gbps": 64, "model.top_k": 1, "gpu.tflops.bf16": 300}``.

    Keys starting with ``model.`` change the model; ``gpu.``, ``link.``, ``cpu.`` and ``storage.``
    change the hardware. Validation runs again on the changed spec.
    """
    for key, value in overrides.items():
        parts = key.split(".")
        if parts[0] == "model":
            if len(parts) < 2:
                raise SpecError(f"--set {key}: name a field, e.g. model.top_k=1")
            model = _set_path(model, parts[1:], value, key)
        elif parts[0] in ("gpu", "link", "cpu", "storage"):
            hardware = _set_path(hardware, parts, value, key)
        elif parts[0] == "runtime":
            continue  # the runtime's own keys: apply_runtime_overrides
        else:
            raise SpecError(
                f"--set {key}: keys start with model., gpu., link., cpu., storage. or runtime. "
                f"(e.g. link.bandwidth_gbps=64)"
            )
    return check_model_numbers(model), check_hardware_numbers(hardware)


def parse_set_options(items: list[str] | None) -> dict[str, str]:
    """``["link.bandwidth_gbps=64"]`` -> ``{"link.bandwidth_gbps": "64"}``."""
    result: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise SpecError(f"--set {item!r}: expected KEY=VALUE, e.g. --set link.bandwidth_gbps=64")
        key, value = item.split("=", 1)
        result[key.strip()] = value.strip()
    return result


# --- the numeric boundary ---------------------------------------------------------------------
# Every number a user can give in a spec (TOML or --set) with its range and unit, checked once
# after loading and after overrides, so a value that would overflow the integer-nanosecond cost
# model (a bandwidth of 1e-30 GB/s), allocate nothing (0-byte experts) or poison arithmetic
# (nan; inf where it is not an idealisation) is one error here and never a crash later.
# (integer?, low, high, unit). Rates (GB/s, TFLOP/s) may also be +inf: an ideal part that costs
# no time, which the cost model supports (the tests use it to isolate copies from compute).
_MODEL_NUMBERS: dict[str, tuple[bool, float, float, str]] = {
    "num_layers": (True, 1, 4096, "layers"),
    "num_experts": (True, 1, 65536, "routed experts per MoE layer"),
    "top_k": (True, 1, 65536, "experts per token"),
    "d_model": (True, 1, 2**20, "hidden size"),
    "d_ff_expert": (True, 1, 2**22, "expert FFN width"),
    "num_heads": (True, 1, 2**16, "attention heads"),
    "num_kv_heads": (True, 1, 2**16, "KV heads"),
    "head_dim": (True, 1, 2**16, "elements per head"),
    "vocab_size": (True, 1, 2**26, "tokens"),
    "dense_params": (True, 0, 10**14, "parameters"),
    "kv_bytes_per_token": (True, 0, 2**40, "bytes per token"),
    "num_shared_experts": (True, 0, 1024, "shared experts"),
    "d_ff_shared": (True, 0, 2**22, "shared-expert FFN width"),
    "d_ff_dense": (True, 0, 2**22, "dense FFN width"),
    "expert_matrices": (True, 1, 16, "weight matrices per expert"),
    "expert_params_override": (True, 0, 10**13, "parameters per expert (0: matrices x d_model x d_ff)"),
    "expert_bits": (False, 0, 64, "bits per weight (0: the dtype's)"),
    "dense_bits": (False, 0, 64, "bits per weight (0: the dtype's)"),
    "kv_bits": (False, 0, 64, "bits per value (0: the dtype's)"),
}
_RATE = (False, 1e-3, 1e6)  # GB/s or TFLOP/s: slower than 1 MB/s would overflow int64 nanoseconds
_HARDWARE_NUMBERS: dict[str, tuple[bool, float, float, str]] = {
    "gpu.memory_gb": (False, 1e-3, 1e5, "GB"),
    "gpu.hbm_bandwidth_gbps": (*_RATE, "GB/s"),
    "gpu.tflops.*": (*_RATE, "TFLOP/s"),
    "gpu.compute_efficiency": (False, 1e-3, 1.0, "fraction of peak"),
    "gpu.memory_efficiency": (False, 1e-3, 1.0, "fraction of peak"),
    "gpu.launch_overhead_us": (False, 0, 1e6, "us"),
    "gpu.workspace_gb": (False, 0, 1e5, "GB"),
    "link.bandwidth_gbps": (*_RATE, "GB/s"),
    "link.per_copy_overhead_us": (False, 0, 1e6, "us"),
    "link.pageable_bandwidth_gbps": (False, 0, 1e6, "GB/s (0: half of pinned)"),
    "link.copy_engines": (True, 1, 64, "copy engines"),
    "cpu.tflops": (*_RATE, "TFLOP/s"),
    "cpu.memory_bandwidth_gbps": (*_RATE, "GB/s"),
    "cpu.memory_gb": (False, 1e-3, 1e7, "GB"),
    "cpu.efficiency": (False, 1e-3, 1.0, "fraction of peak"),
    "cpu.host_speed": (False, 1e-3, 1e3, "single-thread speed relative to the runtime's reference host"),
    "cpu.sockets": (True, 1, 16, "sockets"),
    "cpu.cores": (True, 0, 4096, "cores per socket (0: not given)"),
    "cpu.memory_channels": (True, 0, 64, "DRAM channels per socket (0: not given)"),
    "cpu.memory_mts": (False, 0, 1e5, "MT/s (0: not given)"),
    "cpu.numa_speedup": (False, 1e-3, 16, "throughput of all sockets / one, weights placed per node"),
    "cpu.numa_unplaced_factor": (False, 1e-3, 16, "throughput of all sockets / one, weights not placed per node"),
    "storage.bandwidth_gbps": (False, 0, 1e6, "GB/s (0: no storage tier)"),
    "storage.latency_us": (False, 0, 1e7, "us"),
}
_IDEAL_UNITS = {"GB/s", "TFLOP/s"}
# Fields that may be 0 ("off") but are otherwise at least a minimum rate.
_ZERO_OR_RATE = {"link.pageable_bandwidth_gbps", "storage.bandwidth_gbps"}


def check_number(key: str, value: Any, rule: tuple[bool, float, float, str], owner: str) -> None:
    """Raise SpecError unless ``value`` is a finite number (an integer where ``rule`` says so)
    within the rule's range; the message names the key, the value, the range and its unit."""
    integer, low, high, unit = rule
    fix = f"set it in the TOML or with --set {key}=VALUE"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{owner}: {key}={value!r} is not a number; give {'an integer' if integer else 'a number'} "
                        f"in {low:g}..{high:g} {unit} ({fix})")
    if integer and not isinstance(value, int):
        raise SpecError(f"{owner}: {key}={value!r} must be an integer ({unit}), in {low:g}..{high:g}; {fix}")
    if value == math.inf and unit in _IDEAL_UNITS:
        return
    if not math.isfinite(value):
        raise SpecError(f"{owner}: {key}={value!r} is not finite; give a number in {low:g}..{high:g} {unit} ({fix})")
    floor = low
    if key in _ZERO_OR_RATE and value != 0:
        floor = _RATE[1]
    if not floor <= value <= high:
        zero = "0 or " if key in _ZERO_OR_RATE else ""
        raise SpecError(f"{owner}: {key}={value!r} {unit.split(' (')[0]} is out of range; give {zero}"
                        f"{floor:g}..{high:g} {unit} ({fix})")


def _check_other_numbers(prefix: str, obj: Any, owner: str, known: set[str]) -> None:
    """Numbers in fields without a rule (added later) must at least be finite."""
    for f in dataclasses.fields(obj):
        key = f"{prefix}{f.name}"
        value = getattr(obj, f.name)
        if key in known or isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise SpecError(f"{owner}: {key}={value!r} is not finite; set a finite number")


def check_model_numbers(model: ModelSpec) -> ModelSpec:
    """The numeric boundary of a model spec (see ``_MODEL_NUMBERS``)."""
    owner = f"model {model.name!r}"
    for name, rule in _MODEL_NUMBERS.items():
        check_number(f"model.{name}", getattr(model, name), rule, owner)
    if model.top_k > model.num_experts:
        raise SpecError(f"{owner}: model.top_k={model.top_k} exceeds model.num_experts={model.num_experts}")
    _check_other_numbers("model.", model, owner, {f"model.{n}" for n in _MODEL_NUMBERS})
    if model.expert_bytes() <= 0:
        raise SpecError(f"{owner}: an expert of {model.expert_params} parameters in {model.dtype} is "
                        f"{model.expert_bytes()} bytes; experts must have a positive size")
    return model


def check_hardware_numbers(hardware: HardwareSpec) -> HardwareSpec:
    """The numeric boundary of a hardware spec (see ``_HARDWARE_NUMBERS``)."""
    owner = f"hardware {hardware.name!r}"
    for key, rule in _HARDWARE_NUMBERS.items():
        section, name = key.split(".", 1)
        part = getattr(hardware, section)
        if name == "tflops.*":
            for dtype, value in part.tflops.items():
                check_number(f"gpu.tflops.{dtype}", value, rule, owner)
            continue
        check_number(key, getattr(part, name), rule, owner)
    if hardware.gpu.workspace_gb >= hardware.gpu.memory_gb:
        raise SpecError(f"{owner}: gpu.workspace_gb={hardware.gpu.workspace_gb} GB leaves nothing of "
                        f"gpu.memory_gb={hardware.gpu.memory_gb} GB; lower the workspace or raise the memory")
    for section in ("gpu", "link", "cpu", "storage"):
        _check_other_numbers(f"{section}.", getattr(hardware, section), owner, set(_HARDWARE_NUMBERS))
    return hardware
