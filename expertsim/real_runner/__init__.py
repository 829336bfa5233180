"""The real runner: replay a routing trace with real tensors on a device, under the simulator's
policy objects; calibrate a hardware profile; measure for validation.

Runs with torch + numpy only (the GPU machine has neither polars, plotly nor simpy) and never
imports ``expertsim.sim``. Importing this package does not import torch: the torch modules are
``device``, ``weights``, ``replay``, ``calibrate`` and ``measure``; ``shrink`` and ``profile``
need numpy alone.
"""
from expertsim.real_runner.profile import interp_ns, load_profile, save_profile
from expertsim.real_runner.shrink import read_bundle, shrink_model, slice_layers, write_bundle

__all__ = ["interp_ns", "load_profile", "save_profile", "read_bundle", "shrink_model", "slice_layers",
           "write_bundle"]
