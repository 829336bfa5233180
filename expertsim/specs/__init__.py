"""Model and hardware specs, and the TOML presets shipped with expertsim."""
from expertsim.specs.hardware import CpuSpec, GpuSpec, HardwareSpec, LinkSpec, StorageSpec
from expertsim.specs.loader import (
    apply_overrides,
    apply_runtime_overrides,
    hardware_from_dict,
    list_hardware,
    list_models,
    load_hardware,
    load_model,
    load_runtime,
    list_runtimes,
    model_from_dict,
    runtime_from_dict,
    parse_set_options,
)
from expertsim.specs.model import DTYPE_BITS, ModelSpec, dtype_bits
from expertsim.specs.runtime import RuntimeSpec

__all__ = [
    "CpuSpec", "GpuSpec", "HardwareSpec", "LinkSpec", "StorageSpec", "ModelSpec", "DTYPE_BITS",
    "dtype_bits", "apply_overrides", "hardware_from_dict", "list_hardware", "list_models",
    "load_hardware", "load_model", "model_from_dict", "parse_set_options", "RuntimeSpec", "load_runtime",
    "list_runtimes", "runtime_from_dict", "apply_runtime_overrides",
]
