"""Shrinking a model to fit a machine, slicing a trace to match, and the numpy-only trace bundle.

``shrink_model(spec, layers=N, experts_scale=S)`` keeps the first N MoE layers and scales the
widths (d_model, d_ff, attention heads) by S, so that the real runner's tensors fit the machine
and the simulator is given the very same shrunk spec. Routing is unchanged (same experts per
layer, same top-k), so ``slice_layers(trace, N)`` (the trace's first N MoE layers) drives both.

A *bundle* (``.npz``) carries a trace slice plus the shrunk spec as JSON: the GPU machine has
python3, torch and numpy only (no polars to read Parquet), so the CLI side writes the bundle and
``benchmarks/gpu_validate.py`` reads it with numpy alone.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from expertsim.errors import ConfigError
from expertsim.specs.model import ModelSpec
from expertsim.traces.trace import RoutingTrace


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def shrink_model(spec: ModelSpec, layers: int | None = None, experts_scale: float = 1.0, *,
                 dtype: str | None = None) -> ModelSpec:
    """A smaller copy of ``spec``: its first ``layers`` MoE layers (and the dense layers before
    them), widths scaled by ``experts_scale``, optionally another storage ``dtype``.

    Widths are rounded to multiples of 8; head_dim is kept and the head counts scale (keeping
    the grouped-query ratio). ``dense_params`` and ``kv_bytes_per_token`` are recomputed for the
    stand-in the real runner executes (GQA attention projections, the router, shared experts,
    embedding and LM head), so the simulator and the runner describe the same model.
    """
    n = spec.num_moe_layers if layers is None else int(layers)
    if not 1 <= n <= spec.num_moe_layers:
        raise ConfigError(f"--layers {layers} must be between 1 and {spec.num_moe_layers} "
                          f"(the MoE layers of {spec.name})")
    if not 0 < experts_scale <= 1:
        raise ConfigError(f"--experts-scale {experts_scale} must be in (0, 1]")
    s = float(experts_scale)
    moe_layers = tuple(spec.moe_layers[:n])
    num_layers = moe_layers[-1] + 1
    if s == 1.0:
        d_model, d_ff, d_shared, d_dense = spec.d_model, spec.d_ff_expert, spec.d_ff_shared, spec.d_ff_dense
        heads, kv_heads = spec.num_heads, spec.num_kv_heads
    else:
        d_model = _round_to(spec.d_model * s, 8)
        d_ff = _round_to(spec.d_ff_expert * s, 8)
        d_shared = _round_to(spec.d_ff_shared * s, 8) if spec.d_ff_shared else 0
        d_dense = _round_to(spec.d_ff_dense * s, 8) if spec.d_ff_dense else 0
        group = max(1, spec.num_heads // spec.num_kv_heads)
        kv_heads = max(1, int(round(spec.num_kv_heads * s)))
        heads = kv_heads * group
    out_dtype = dtype or spec.dtype
    from expertsim.specs.model import dtype_bits

    bytes_per_param = dtype_bits(out_dtype) / 8
    hd = spec.head_dim
    attention = d_model * heads * hd * 2 + d_model * kv_heads * hd * 2
    router = d_model * spec.num_experts
    shared = spec.num_shared_experts * spec.expert_matrices * d_model * d_shared
    dense_ffn = spec.expert_matrices * d_model * d_dense * (num_layers - n)
    dense_params = num_layers * (attention + router) + n * shared + dense_ffn + 2 * spec.vocab_size * d_model
    kv_bytes = int(2 * num_layers * kv_heads * hd * bytes_per_param)
    suffix = f"-L{n}" + (f"-x{s:g}" if s != 1.0 else "") + (f"-{out_dtype}" if dtype else "")
    return dataclasses.replace(
        spec, name=spec.name + suffix, num_layers=num_layers, moe_layers=moe_layers,
        d_model=d_model, d_ff_expert=d_ff, d_ff_shared=d_shared, d_ff_dense=d_dense,
        num_heads=heads, num_kv_heads=kv_heads, dense_params=int(dense_params),
        kv_bytes_per_token=kv_bytes, dtype=out_dtype, expert_params_override=0,
        notes=f"shrunk from {spec.name}: first {n} MoE layers, widths x{s:g}",
    )


def slice_layers(trace: RoutingTrace, layers: int) -> RoutingTrace:
    """The trace restricted to its first ``layers`` MoE layers (every token kept)."""
    if not 1 <= layers <= trace.num_layers:
        raise ConfigError(f"cannot keep {layers} MoE layers of a trace with {trace.num_layers}")
    extras = {k: (v[:, :layers] if v.ndim >= 2 and v.shape[1] == trace.num_layers else v)
              for k, v in trace.extras.items()}
    return RoutingTrace(
        experts=trace.experts[:, :layers], request=trace.request, step=trace.step,
        position=trace.position, phase=trace.phase, num_experts=trace.num_experts,
        token_id=trace.token_id, weights=None if trace.weights is None else trace.weights[:, :layers],
        metadata={**trace.metadata, "layers_kept": str(layers)}, extras=extras,
    )


# --- the bundle: trace slice + spec, numpy only ----------------------------------------------
def spec_to_json(spec: ModelSpec) -> str:
    return json.dumps(dataclasses.asdict(spec))


def spec_from_json(text: str) -> ModelSpec:
    data = json.loads(text)
    data["moe_layers"] = tuple(data["moe_layers"])
    return ModelSpec(**data)


def write_bundle(path: str | Path, trace: RoutingTrace, spec: ModelSpec, settings: dict | None = None) -> Path:
    """Write ``trace`` and ``spec`` (and a JSON-able ``settings`` dict) to one ``.npz``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"experts": trace.experts, "request": trace.request, "step": trace.step,
              "position": trace.position, "phase": trace.phase,
              "num_experts": np.array(trace.num_experts),
              "metadata": np.array(json.dumps({k: str(v) for k, v in trace.metadata.items()})),
              "spec": np.array(spec_to_json(spec)), "settings": np.array(json.dumps(settings or {}))}
    if trace.weights is not None:
        arrays["weights"] = trace.weights
    if trace.token_id is not None:
        arrays["token_id"] = trace.token_id
    np.savez_compressed(path, **arrays)
    return path


def read_bundle(path: str | Path) -> tuple[RoutingTrace, ModelSpec, dict]:
    """(trace, spec, settings) from a bundle written by :func:`write_bundle`."""
    with np.load(path, allow_pickle=False) as z:
        trace = RoutingTrace(
            experts=z["experts"], request=z["request"], step=z["step"], position=z["position"],
            phase=z["phase"], num_experts=int(z["num_experts"]),
            weights=z["weights"] if "weights" in z else None,
            token_id=z["token_id"] if "token_id" in z else None,
            metadata=json.loads(str(z["metadata"])),
        )
        spec = spec_from_json(str(z["spec"]))
        settings = json.loads(str(z["settings"]))
    return trace, spec, settings
