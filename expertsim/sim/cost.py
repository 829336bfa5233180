"""Cost model: how long each copy and compute takes, in integer nanoseconds.

Every timing rule of the simulator lives here (the engines only decide *when* a term starts), so
that the DES and the fast engine compute identical numbers. Two sources, per term:

- a roofline from the specs (datasheet numbers with efficiency factors), or
- a calibrated profile (tables measured by ``expertsim calibrate``, the JSON format documented in
  ``expertsim/specs/profile.py``; read here with json + numpy, never by importing
  real_runner), interpolated linearly and extrapolated linearly beyond the last point.

Roofline terms:

- Link. ``transfer_time_ns(bytes)`` = per-copy overhead + bytes / bandwidth(bytes). The bandwidth
  is the spec's effective pinned (or pageable) rate, or a size-dependent curve
  (:class:`LinkCurve`: GB/s at given copy sizes, interpolated linearly, clamped at the ends;
  pageable copies scale it by pageable/pinned). The engine splits a copy into an *overhead*
  phase (``copy_overhead_ns``: a copy engine is busy, the wire is free) and a *wire* phase
  (``copy_wire_ns``: the bytes cross the shared link), so that with several copy engines the
  overhead of one copy overlaps the bytes of another. ``chunk_sizes`` splits a copy into chunks
  (ProMoE): each chunk pays the overhead and runs at the bandwidth of its own size.
- Storage tier. ``storage_read_ns(bytes)`` = latency + bytes / storage bandwidth (NVMe -> host).
- ``expert_time_ns(tokens)`` = launch overhead + max(expert bytes / (HBM bw x memory efficiency),
  expert FLOPs / (peak FLOP/s x compute efficiency)); FLOPs = 2 x params x tokens. A low-precision
  copy reads its own (fewer) bytes and adds ``DEQUANT_FLOPS_PER_PARAM`` FLOPs per parameter
  (unpack + scale) to the GEMM's FLOPs, at the model dtype's rate (fused dequantisation).
- ``dense_layer_time_ns(tokens, context, attention_pairs)`` = launch overhead + max((dense bytes
  per layer + KV bytes read) / (HBM bw x eff), dense FLOPs / (peak x eff)); KV read = context
  tokens (summed over the batch) x KV bytes per token per layer; attention FLOPs = 4 x heads x
  head_dim x attention_pairs, where attention_pairs = sum over requests of new tokens x context
  (tokens x context at batch 1). The router's GEMM and weights are part of the dense layer
  (``dense_params`` counts the router; ``router_time_ns`` reports it alone for the printout).
- ``cpu_expert_time_ns(tokens)`` = max(expert bytes / CPU memory bw, FLOPs / (CPU FLOP/s of the
  model dtype x eff)) plus the activations' two small copies over the link (to the host and back).
  ``cpu.tflops_by_dtype`` gives the instruction set's rate per dtype (bf16 without AVX512_BF16).
  The runtime scales both terms (``cpu_bandwidth_fraction``, ``cpu_flops_fraction``, the GEMM's
  ``cpu_gemm_dtype``; per expert format ``cpu_kernels_by_format``, e.g. FP8 weights on a
  different kernel from GGUF blocks) and a multi-socket host multiplies them by ``cpu.socket_scale`` (NUMA
  placement). ``cpu_layer_time_ns`` is a layer's CPU experts as one job (activations once).
- Quantised experts (``model.expert_bits`` below the dtype's bits) are stored, copied and read in
  their own bytes and pay ``DEQUANT_FLOPS_PER_PARAM`` per parameter at compute time (fused).
- Runtime (:class:`~expertsim.specs.runtime.RuntimeSpec`): the stack's exposed host time is added
  to the compute terms it belongs to, divided by ``cpu.host_speed``: ``host_us_per_layer`` to
  each dense layer, ``host_us_per_expert`` to each GPU expert call; its kernel time beyond the
  roofline (``kernel_us_per_layer``, ``kernel_us_per_expert``) likewise, undivided. Copy semantics (compute
  stream, write-back) are the engine's (:mod:`expertsim.sim.engine`); ``pinned_host`` picks the
  link's pinned or pageable rate.

Units: bytes, GB/s = 1e9 bytes/s, TFLOP/s = 1e12 FLOP/s, times rounded to the nearest ns.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from expertsim.errors import ConfigError
from expertsim.specs import HardwareSpec, ModelSpec, RuntimeSpec
from expertsim.specs.profile import interp_extrapolate, read_profile_json

# Fused dequantisation of a low-bit expert: about one multiply and one convert per weight.
DEQUANT_FLOPS_PER_PARAM = 2.0


def runtime_for(system, runtime=None, overrides: dict | None = None) -> RuntimeSpec:
    """The runtime a run uses: ``runtime`` (a RuntimeSpec, a preset name or a TOML path), else the
    system's own (``System.runtime``: a named system runs on the stack it was released with),
    else ``default``; with the ``runtime.``-prefixed keys of ``overrides`` applied (``--set
    runtime.X=...``; other keys are ignored)."""
    from expertsim.specs import apply_runtime_overrides, load_runtime

    spec = runtime if isinstance(runtime, RuntimeSpec) else \
        load_runtime(runtime or getattr(system, "runtime", None) or "default")
    return apply_runtime_overrides(spec, overrides) if overrides else spec


def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


# --- tables -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinkCurve:
    """Host-to-device bandwidth (GB/s, pinned) as a function of the copy size in bytes, e.g. the
    bandwidthTest sweep: small copies do not reach the line rate. Interpolated linearly between
    points, clamped to the first/last value outside them."""

    nbytes: tuple[float, ...]
    gbps: tuple[float, ...]

    def __post_init__(self) -> None:
        x, y = np.asarray(self.nbytes, dtype=float), np.asarray(self.gbps, dtype=float)
        if len(x) == 0 or x.shape != y.shape:
            raise ConfigError("link curve: give equal, non-empty lists of bytes and gbps")
        if (np.diff(x) <= 0).any():
            raise ConfigError(f"link curve: bytes must be strictly increasing, got {list(self.nbytes)}")
        if not (y > 0).all():
            raise ConfigError(f"link curve: every bandwidth must be > 0 GB/s, got {list(self.gbps)}")

    @classmethod
    def from_dict(cls, data: dict) -> "LinkCurve":
        return cls(tuple(float(v) for v in data["bytes"]), tuple(float(v) for v in data["gbps"]))

    def gbps_at(self, nbytes: float) -> float:
        return float(np.interp(nbytes, self.nbytes, self.gbps))


@dataclass(frozen=True)
class CostProfile:
    """Measured tables (the calibration profile). Times scale to the simulated model when the
    profile was measured on a shrunk stand-in: expert tables by the ratio of expert parameters,
    the dense table by the ratio of dense bytes per layer (both 1 when the profile names no
    ``model_spec`` or the same shape)."""

    tables: dict
    source: str = "profile"
    expert_scale: float = 1.0
    dense_scale: float = 1.0
    device: str = "?"

    @classmethod
    def load(cls, path: str | Path, model: ModelSpec | None = None) -> "CostProfile":
        return cls.from_dict(read_profile_json(path), source=str(path), model=model)

    @classmethod
    def from_dict(cls, data: dict, source: str = "profile", model: ModelSpec | None = None) -> "CostProfile":
        axes = {"copy": "bytes", "expert": "tokens", "cpu_expert": "tokens"}
        for name, axis in axes.items():
            table = data.get(name)
            if not isinstance(table, dict):
                raise ConfigError(f"{source}: table {name!r} is missing (expected {{{axis!r}: [...], 'ns': [...]}})")
            x, y = np.asarray(table.get(axis, []), dtype=float), np.asarray(table.get("ns", []), dtype=float)
            if len(x) == 0 or x.shape != y.shape:
                raise ConfigError(f"{source}: table {name!r} needs equal, non-empty {axis!r} and 'ns' lists")
            if (np.diff(x) <= 0).any():
                raise ConfigError(f"{source}: table {name!r} {axis!r} must be strictly increasing")
        dense = data.get("dense")
        if not isinstance(dense, dict):
            raise ConfigError(f"{source}: table 'dense' is missing")
        ns = np.asarray(dense.get("ns", []), dtype=float)
        if ns.shape != (len(dense.get("tokens", [])), len(dense.get("context", []))) or ns.size == 0:
            raise ConfigError(f"{source}: dense ns must be [len(tokens)][len(context)], got shape {ns.shape}")
        expert_scale = dense_scale = 1.0
        spec = data.get("model_spec")
        if model is not None and isinstance(spec, dict):
            from expertsim.specs.loader import model_from_dict

            measured = model_from_dict(dict(spec), name="profiled")
            expert_scale = model.expert_params / measured.expert_params
            if measured.dense_bytes_per_layer > 0:
                dense_scale = model.dense_bytes_per_layer / measured.dense_bytes_per_layer
        return cls(tables=data, source=source, expert_scale=expert_scale, dense_scale=dense_scale,
                   device=str(data.get("device", "?")))

    def ns_1d(self, name: str, x: float) -> float:
        table = self.tables[name]
        axis = "bytes" if "bytes" in table else "tokens"
        return max(interp_extrapolate(np.asarray(table[axis], dtype=float),
                                       np.asarray(table["ns"], dtype=float), x), 0.0)

    def ns_dense(self, tokens: float, context: float) -> float:
        table = self.tables["dense"]
        t = np.asarray(table["tokens"], dtype=float)
        c = np.asarray(table["context"], dtype=float)
        ns = np.asarray(table["ns"], dtype=float)
        column = np.array([interp_extrapolate(c, row, context) for row in ns])
        return max(interp_extrapolate(t, column, tokens), 0.0)


# --- the cost model -----------------------------------------------------------------------------
@dataclass(frozen=True)
class CostModel:
    """The time of every copy and compute (see the module docstring). ``profile`` replaces the
    roofline terms it has tables for; ``link_curve`` makes the link bandwidth size-dependent."""

    model: ModelSpec
    hardware: HardwareSpec
    profile: CostProfile | None = None
    link_curve: LinkCurve | None = None
    runtime: RuntimeSpec | None = None
    _memo: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.runtime is None:
            object.__setattr__(self, "runtime", RuntimeSpec(name="default"))
        if self.runtime.pinned_host is not None and self.runtime.pinned_host != self.hardware.link.pinned:
            import dataclasses

            link = dataclasses.replace(self.hardware.link, pinned=self.runtime.pinned_host)
            object.__setattr__(self, "hardware", dataclasses.replace(self.hardware, link=link))
        speed = self.hardware.cpu.host_speed
        object.__setattr__(self, "host_layer_ns", _ns(self.runtime.host_us_per_layer * 1e-6 / speed))
        object.__setattr__(self, "host_expert_ns", _ns(self.runtime.host_us_per_expert * 1e-6 / speed))
        object.__setattr__(self, "cpu_sync_layer_ns", _ns(self.runtime.cpu_sync_us_per_layer * 1e-6 / speed))
        object.__setattr__(self, "kernel_layer_ns", _ns(self.runtime.kernel_us_per_layer * 1e-6))
        object.__setattr__(self, "kernel_expert_ns", _ns(self.runtime.kernel_us_per_expert * 1e-6))
        # The CPU expert kernel of this model's experts on this runtime, once: (GEMM dtype, fraction
        # of its rate reached, what the sockets give together).
        gemm_dtype, fraction = self.runtime.cpu_kernel("quantised" if self.model.experts_quantised else self.model.dtype)
        object.__setattr__(self, "cpu_kernel", (gemm_dtype or self.model.dtype, fraction,
                                                self.hardware.cpu.socket_scale(self.runtime.numa_placement == "node")))
        if self.link_curve is None:
            curve = getattr(self.hardware.link, "bandwidth_curve", None)
            if curve:
                object.__setattr__(self, "link_curve", LinkCurve.from_dict(curve))

    # --- link ----------------------------------------------------------------------------
    def link_bandwidth_gbps(self, nbytes: int) -> float:
        """Effective host-to-device bandwidth of one copy of ``nbytes`` (pinned or pageable)."""
        link = self.hardware.link
        if self.link_curve is None:
            return link.effective_bandwidth_gbps
        return self.link_curve.gbps_at(nbytes) * (link.effective_bandwidth_gbps / link.bandwidth_gbps)

    def transfer_time_ns(self, nbytes: int) -> int:
        """One host-to-device copy of ``nbytes`` from host memory: overhead + wire time."""
        if nbytes <= 0:
            return 0
        if self.profile is not None:
            table = "copy" if self.hardware.link.pinned or "copy_pageable" not in self.profile.tables else "copy_pageable"
            return int(round(self.profile.ns_1d(table, nbytes)))
        link = self.hardware.link
        return _ns(link.per_copy_overhead_us * 1e-6 + nbytes / (self.link_bandwidth_gbps(nbytes) * 1e9))

    def copy_overhead_ns(self, nbytes: int) -> int:
        """The part of a copy that holds a copy engine but not the wire (launch + DMA setup)."""
        if nbytes <= 0:
            return 0
        return min(_ns(self.hardware.link.per_copy_overhead_us * 1e-6), self.transfer_time_ns(nbytes))

    def copy_wire_ns(self, nbytes: int) -> int:
        """The part of a copy during which its bytes occupy the (shared, serial) link."""
        return self.transfer_time_ns(nbytes) - self.copy_overhead_ns(nbytes)

    @staticmethod
    def chunk_sizes(nbytes: int, chunk_bytes: int | None) -> list[int]:
        """A copy split into chunks of at most ``chunk_bytes`` (None or 0: one chunk)."""
        nbytes = int(nbytes)
        if not chunk_bytes or chunk_bytes >= nbytes:
            return [nbytes]
        full, rest = divmod(nbytes, int(chunk_bytes))
        return [int(chunk_bytes)] * full + ([rest] if rest else [])

    def chunked_wire_ns(self, nbytes: int, chunk_bytes: int | None) -> int:
        """Wire time of a copy issued in chunks (the link bound's per-copy term)."""
        return sum(self.copy_wire_ns(c) for c in self.chunk_sizes(nbytes, chunk_bytes))

    def storage_read_ns(self, nbytes: int) -> int:
        """Reading ``nbytes`` from the storage tier (NVMe) into host memory."""
        storage = self.hardware.storage
        if nbytes <= 0:
            return 0
        if storage.bandwidth_gbps <= 0:
            raise ConfigError("the storage tier has no bandwidth: set --set storage.bandwidth_gbps=7 (NVMe)")
        return _ns(storage.latency_us * 1e-6 + nbytes / (storage.bandwidth_gbps * 1e9))

    # --- GPU compute ---------------------------------------------------------------------
    def _roofline_ns(self, nbytes: float, flops: float, dtype: str) -> int:
        gpu = self.hardware.gpu
        t_mem = nbytes / (gpu.hbm_bandwidth_gbps * 1e9 * gpu.memory_efficiency)
        t_flop = flops / (gpu.peak_flops(dtype) * gpu.compute_efficiency)
        return _ns(gpu.launch_overhead_us * 1e-6 + max(t_mem, t_flop))

    def expert_time_ns(self, tokens: int, *, low_precision_dtype: str | None = None) -> int:
        """One routed expert's FFN over ``tokens`` tokens on the GPU. A low-precision copy reads
        fewer bytes and pays the dequantisation FLOPs (see the module docstring)."""
        if tokens <= 0:
            return 0
        key = ("expert", tokens, low_precision_dtype)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        m = self.model
        if self.profile is not None:
            t = int(round(self.profile.ns_1d("expert", tokens) * self.profile.expert_scale))
            if low_precision_dtype is not None:
                t += self.dequant_time_ns(low_precision_dtype)
        elif low_precision_dtype is None:
            flops = m.expert_flops(tokens)
            if m.experts_quantised:
                flops += DEQUANT_FLOPS_PER_PARAM * m.expert_params
            t = self._roofline_ns(m.expert_bytes(), flops, m.dtype)
        else:
            flops = m.expert_flops(tokens) + DEQUANT_FLOPS_PER_PARAM * m.expert_params
            t = self._roofline_ns(m.expert_bytes(low_precision_dtype), flops, m.dtype)
        t += self.host_expert_ns + self.kernel_expert_ns
        self._memo[key] = t
        return t

    def dequant_time_ns(self, low_precision_dtype: str) -> int:
        """Dequantisation FLOPs of one low-bit expert alone (no launch): the profile path adds it
        to the measured full-precision GEMM."""
        gpu, m = self.hardware.gpu, self.model
        return _ns(DEQUANT_FLOPS_PER_PARAM * m.expert_params / (gpu.peak_flops(m.dtype) * gpu.compute_efficiency))

    def dense_layer_time_ns(self, tokens: int, context_tokens: int, attention_pairs: int | None = None) -> int:
        """Attention, projections, norms, router (and any dense FFN or shared expert) of one
        layer for ``tokens`` new tokens attending to ``context_tokens`` cached ones in total
        (summed over the batch). ``attention_pairs`` = sum over the batch's requests of new
        tokens x their context; None means tokens x context_tokens (one request)."""
        if tokens <= 0:
            return 0
        key = ("dense", tokens, context_tokens, attention_pairs)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        m = self.model
        if self.profile is not None:
            t = int(round(self.profile.ns_dense(tokens, context_tokens) * self.profile.dense_scale))
        else:
            nbytes = m.dense_bytes_per_layer + context_tokens * m.kv_bytes_per_token_per_layer
            if attention_pairs is None:
                flops = m.dense_flops_per_layer(tokens, context_tokens)
            else:
                flops = m.dense_flops_per_layer(tokens, 0) + 4.0 * m.num_heads * m.head_dim * attention_pairs
            t = self._roofline_ns(nbytes, flops, m.dtype)
        t += self.host_layer_ns + self.kernel_layer_ns
        if len(self._memo) < 200_000:
            self._memo[key] = t
        return t

    def dense_layer_times_ns(self, tokens: np.ndarray, context_tokens: np.ndarray) -> np.ndarray:
        """:meth:`dense_layer_time_ns` for arrays of (tokens, context) pairs of one request each,
        int64, equal element by element (the roofline in the same float operations, in the
        same order; a profile is read pair by pair)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        context_tokens = np.asarray(context_tokens, dtype=np.int64)
        if self.profile is not None:
            return np.array([self.dense_layer_time_ns(int(t), int(c))
                             for t, c in zip(tokens.tolist(), context_tokens.tolist())], dtype=np.int64)
        m, gpu = self.model, self.hardware.gpu
        nbytes = m.dense_bytes_per_layer + context_tokens * m.kv_bytes_per_token_per_layer
        weight_flops = 2.0 * (m.dense_params - m.vocab_size * m.d_model) / m.num_layers * tokens.astype(np.float64)
        attention_flops = 4.0 * m.num_heads * m.head_dim * context_tokens.astype(np.float64) * tokens
        flops = np.maximum(weight_flops, 0.0) + attention_flops
        t_mem = nbytes / (gpu.hbm_bandwidth_gbps * 1e9 * gpu.memory_efficiency)
        t_flop = flops / (gpu.peak_flops(m.dtype) * gpu.compute_efficiency)
        seconds = gpu.launch_overhead_us * 1e-6 + np.maximum(t_mem, t_flop)
        return np.where(tokens > 0, np.rint(seconds * 1e9).astype(np.int64) + self.host_layer_ns + self.kernel_layer_ns, 0).astype(np.int64)

    def router_time_ns(self, tokens: int) -> int:
        """The router GEMM alone (d_model x experts), for the printout: the engine charges it
        inside ``dense_layer_time_ns`` (its weights are part of ``dense_params``)."""
        m = self.model
        return self._roofline_ns(m.d_model * m.num_experts * m.bytes_per_param,
                                 2.0 * m.d_model * m.num_experts * tokens, m.dtype)

    # --- CPU compute ---------------------------------------------------------------------
    def cpu_compute_ns(self, tokens: int) -> int:
        """A routed expert's FFN on the host CPU, without the activation copies."""
        if tokens <= 0:
            return 0
        if self.profile is not None:
            return int(round(self.profile.ns_1d("cpu_expert", tokens) * self.profile.expert_scale))
        cpu, m = self.hardware.cpu, self.model
        gemm_dtype, fraction, sockets = self.cpu_kernel
        t_mem = m.expert_bytes() / (cpu.memory_bandwidth_gbps * 1e9 * self.runtime.cpu_bandwidth_fraction * sockets)
        rate = cpu.gemm_flops(gemm_dtype) * cpu.efficiency * fraction * sockets
        return _ns(max(t_mem, m.expert_flops(tokens) / rate))

    def cpu_rate_note(self) -> str:
        """One line for a run's assumptions: the host rates its CPU experts ran at, and where the
        GEMM rate comes from (the spec, or the instruction set)."""
        cpu = self.hardware.cpu
        gemm_dtype, fraction, sockets = self.cpu_kernel
        rate, why = cpu.gemm_rate(gemm_dtype)
        return (f"CPU experts: {cpu.sockets} socket(s) x {cpu.memory_bandwidth_gbps:g} GB/s x "
                f"{self.runtime.cpu_bandwidth_fraction:g} of it (socket scale {sockets:g}); GEMM {gemm_dtype} at "
                f"{rate:g} TFLOP/s per socket ({why}) x efficiency {cpu.efficiency:g} x {fraction:g}")

    def activation_copy_ns(self, tokens: int) -> int:
        """One direction of the activations a CPU expert needs (tokens x d_model)."""
        m = self.model
        return self.transfer_time_ns(int(tokens * m.d_model * m.bytes_per_param))

    def cpu_expert_time_ns(self, tokens: int) -> int:
        """A routed expert computed on the host CPU (Fiddler): weights read from host memory,
        activations copied host-ward and back over the link (two small copies)."""
        if tokens <= 0:
            return 0
        return self.cpu_compute_ns(tokens) + 2 * self.activation_copy_ns(tokens)

    def cpu_layer_time_ns(self, expert_tokens: list[int], layer_tokens: int) -> int:
        """A layer's CPU-resident experts computed on the host as one job (KTransformers,
        llama.cpp): the layer's activations cross the link once each way (``layer_tokens`` x
        d_model), then the experts run one after another on all cores (their times add), plus the
        runtime's hand-over and barrier time per CPU layer (``cpu_sync_us_per_layer``)."""
        if not expert_tokens:
            return 0
        return (2 * self.activation_copy_ns(layer_tokens) + sum(self.cpu_compute_ns(t) for t in expert_tokens)
                + self.cpu_sync_layer_ns)

    # --- summary -------------------------------------------------------------------------
    def describe(self) -> dict:
        """The cost terms at batch 1, for the printed assumptions."""
        m = self.model
        return {
            "expert_copy_ms": self.transfer_time_ns(m.expert_bytes()) / 1e6,
            "expert_compute_ms_1tok": self.expert_time_ns(1) / 1e6,
            "dense_layer_ms_1tok": self.dense_layer_time_ns(1, 1) / 1e6,
            "router_ms_1tok": self.router_time_ns(1) / 1e6,
            "cpu_expert_ms_1tok": self.cpu_expert_time_ns(1) / 1e6,
            "host_ms_per_layer": self.host_layer_ns / 1e6,
            "host_ms_per_expert": self.host_expert_ns / 1e6,
            "source": f"profile {self.profile.source} ({self.profile.device})" if self.profile else "roofline",
        }
