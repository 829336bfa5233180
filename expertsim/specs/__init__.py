"""Model and hardware specs, and the TOML presets shipped with expertsim."""
from expertsim.specs.hardware import CpuSpec, GpuSpec, HardwareSpec, LinkSpec, StorageSpec
from expertsim.specs.loader import (
    apply_overrides,
    hardware_from_dict,
    list_hardware,
    list_models,
    load_hardware,
    load_model,
    model_from_dict,
    parse_set_options,
)
from expertsim.specs.model import DTYPE_BITS, ModelSpec, dtype_bits

__all__ = [
    "CpuSpec", "GpuSpec", "HardwareSpec", "LinkSpec", "StorageSpec", "ModelSpec", "DTYPE_BITS",
    "dtype_bits", "apply_overrides", "hardware_from_dict", "list_hardware", "list_models",
    "load_hardware", "load_model", "model_from_dict", "parse_set_options",
]
