"""Cost model: how long each copy and compute takes, in integer nanoseconds.

Every term is a roofline from the specs (or, later, a calibrated table):

- ``transfer_time_ns(bytes)`` = per-copy overhead + bytes / effective link bandwidth.
- ``expert_time_ns(tokens)`` = launch overhead + max(expert bytes / (HBM bw x memory efficiency),
  expert FLOPs / (peak FLOP/s x compute efficiency)); FLOPs = 2 x params x tokens.
- ``dense_layer_time_ns(tokens, context)`` = launch overhead + max((dense bytes per layer + KV bytes
  read) / (HBM bw x eff), dense FLOPs / (peak x eff)); KV read = context tokens x KV bytes per
  token per layer.
- ``cpu_expert_time_ns(tokens)`` = max(expert bytes / CPU memory bw, FLOPs / CPU FLOP/s x eff)
  plus the activations' round trip over the link.

Units: bytes, GB/s = 1e9 bytes/s, TFLOP/s = 1e12 FLOP/s, times rounded to the nearest ns.
"""
from __future__ import annotations

from dataclasses import dataclass

from expertsim.specs import HardwareSpec, ModelSpec


def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


@dataclass(frozen=True)
class CostModel:
    model: ModelSpec
    hardware: HardwareSpec

    # --- link ----------------------------------------------------------------------------
    def transfer_time_ns(self, nbytes: int) -> int:
        """Host-to-device copy of ``nbytes`` from host memory."""
        if nbytes <= 0:
            return 0
        link = self.hardware.link
        return _ns(link.per_copy_overhead_us * 1e-6 + nbytes / (link.effective_bandwidth_gbps * 1e9))

    # --- GPU compute ---------------------------------------------------------------------
    def _roofline_ns(self, nbytes: float, flops: float, dtype: str) -> int:
        gpu = self.hardware.gpu
        t_mem = nbytes / (gpu.hbm_bandwidth_gbps * 1e9 * gpu.memory_efficiency)
        t_flop = flops / (gpu.peak_flops(dtype) * gpu.compute_efficiency)
        return _ns(gpu.launch_overhead_us * 1e-6 + max(t_mem, t_flop))

    def expert_time_ns(self, tokens: int, *, low_precision_dtype: str | None = None) -> int:
        """One routed expert's FFN over ``tokens`` tokens on the GPU. A low-precision copy reads
        fewer bytes; its GEMM runs at the model dtype's rate after dequantisation."""
        if tokens <= 0:
            return 0
        nbytes = self.model.expert_bytes(low_precision_dtype)
        return self._roofline_ns(nbytes, self.model.expert_flops(tokens), self.model.dtype)

    def dense_layer_time_ns(self, tokens: int, context_tokens: int) -> int:
        """Attention, projections, norms, router (and any dense FFN or shared expert) of one
        layer for ``tokens`` new tokens attending to ``context_tokens`` cached ones in total."""
        if tokens <= 0:
            return 0
        m = self.model
        nbytes = m.dense_bytes_per_layer + context_tokens * m.kv_bytes_per_token_per_layer
        flops = m.dense_flops_per_layer(tokens, context_tokens)
        return self._roofline_ns(nbytes, flops, m.dtype)

    # --- CPU compute ---------------------------------------------------------------------
    def cpu_expert_time_ns(self, tokens: int) -> int:
        """A routed expert computed on the host CPU (Fiddler): weights read from host memory,
        activations copied host-ward and back over the link (two small copies)."""
        if tokens <= 0:
            return 0
        cpu = self.hardware.cpu
        m = self.model
        t_mem = m.expert_bytes() / (cpu.memory_bandwidth_gbps * 1e9)
        t_flop = m.expert_flops(tokens) / (cpu.tflops * 1e12 * cpu.efficiency)
        activation_bytes = tokens * m.d_model * m.bytes_per_param
        return _ns(max(t_mem, t_flop)) + 2 * self.transfer_time_ns(int(activation_bytes))

    def describe(self) -> dict:
        """The cost terms at batch 1, for the printed assumptions."""
        m = self.model
        return {
            "expert_copy_ms": self.transfer_time_ns(m.expert_bytes()) / 1e6,
            "expert_compute_ms_1tok": self.expert_time_ns(1) / 1e6,
            "dense_layer_ms_1tok": self.dense_layer_time_ns(1, 1) / 1e6,
            "cpu_expert_ms_1tok": self.cpu_expert_time_ns(1) / 1e6,
        }
