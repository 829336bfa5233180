"""Tiny shrunk models and trace slices, so that every real-runner test runs in seconds on 2 cores."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="session")
def tiny_spec():
    from expertsim.real_runner import shrink_model
    from expertsim.specs import load_model

    # Mixtral's routing (8 experts, top-2) on 2 MoE layers of width 4096/32 = 128, fp32.
    return shrink_model(load_model("mixtral-8x7b"), layers=2, experts_scale=1 / 32, dtype="fp32")


@pytest.fixture(scope="session")
def tiny_trace():
    from expertsim.real_runner import slice_layers
    from expertsim.traces.synth import default_trace

    # 3 requests of 6 prefill + 24 decode tokens, first 2 MoE layers.
    return slice_layers(default_trace(num_requests=3, decode_tokens=24, prefill_tokens=6), 2)


@pytest.fixture
def cpu_device():
    from expertsim.real_runner.device import CpuEmulatedDevice

    dev = CpuEmulatedDevice()
    yield dev
    dev.close()
