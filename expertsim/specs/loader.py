"""Load specs from the TOML presets shipped in the package, or from a user's own TOML file."""
from __future__ import annotations

import dataclasses
import difflib
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
        return ModelSpec(**data)
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
    return HardwareSpec(**data, **parts)


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
    return dataclasses.replace(obj, **{head: new_value})


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
    return model, hardware


def parse_set_options(items: list[str] | None) -> dict[str, str]:
    """``["link.bandwidth_gbps=64"]`` -> ``{"link.bandwidth_gbps": "64"}``."""
    result: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise SpecError(f"--set {item!r}: expected KEY=VALUE, e.g. --set link.bandwidth_gbps=64")
        key, value = item.split("=", 1)
        result[key.strip()] = value.strip()
    return result
