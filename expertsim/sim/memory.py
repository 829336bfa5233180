"""GPU and host memory in bytes: what must fit, and where each expert lives.

GPU: dense weights (attention, embeddings, norms, routers, shared experts, dense FFNs: all of
``ModelSpec.dense_bytes``) + the KV cache of the tokens in flight (grows with every request's
context, freed when the request ends) + the activation workspace + the expert cache (its byte
capacity: per-layer slots x expert bytes, or a byte budget; entries of any size, e.g. low-precision
copies, are accounted by their bytes in the shared ExpertCache). The checks raise ConfigError with
how much is missing and what to change.

Host: the experts live in host memory (``cpu.memory_gb``) when they fit; otherwise the storage tier
(NVMe) holds the rest and a copy of such an expert first reads it into a host bounce buffer. Which
experts stay in host memory is a static rule: the first ones in key order (layer-major) that fit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from expertsim.errors import ConfigError
from expertsim.specs import HardwareSpec, ModelSpec


@dataclass(frozen=True)
class GpuMemory:
    """The GPU's byte budget for one run."""

    model: ModelSpec
    hardware: HardwareSpec
    expert_cache_bytes: int
    ignores_capacity: bool = False  # the all-on-GPU bound: report, never fail

    @property
    def capacity_bytes(self) -> int:
        return self.hardware.gpu.memory_bytes

    @property
    def workspace_bytes(self) -> int:
        return int(self.hardware.gpu.workspace_gb * 1e9)

    def kv_bytes(self, kv_tokens: int) -> int:
        return int(round(self.model.kv_bytes_per_token_stored * int(kv_tokens)))

    def fixed_bytes(self) -> int:
        """Dense weights + workspace: present for the whole run."""
        return self.model.dense_bytes + self.workspace_bytes

    def check(self, kv_tokens: int, *, where: str = "") -> dict:
        """Raise ConfigError when dense + KV of ``kv_tokens`` + workspace, or that plus the expert
        cache, exceed GPU memory. Returns the terms in bytes."""
        m, gpu, name = self.model, self.hardware.gpu, self.hardware.name
        need = {
            "dense_bytes": m.dense_bytes,
            "kv_bytes": self.kv_bytes(kv_tokens),
            "workspace_bytes": self.workspace_bytes,
            "expert_cache_bytes": int(self.expert_cache_bytes),
        }
        base = need["dense_bytes"] + need["kv_bytes"] + need["workspace_bytes"]
        if base > self.capacity_bytes:
            raise ConfigError(
                f"dense weights ({m.dense_bytes / 1e9:.2f} GB) + KV cache ({need['kv_bytes'] / 1e9:.2f} GB"
                f" for {kv_tokens} tokens{where}) + workspace ({gpu.workspace_gb} GB) need {base / 1e9:.2f} GB "
                f"but {name} has {gpu.memory_gb} GB: short by {(base - self.capacity_bytes) / 1e9:.2f} GB "
                f"(a smaller --batch, shorter requests, or a larger gpu.memory_gb)"
            )
        if not self.ignores_capacity and base + self.expert_cache_bytes > self.capacity_bytes:
            free = self.capacity_bytes - base
            short = base + self.expert_cache_bytes - self.capacity_bytes
            raise ConfigError(
                f"expert cache of {self.expert_cache_bytes / 1e9:.2f} GB does not fit{where}: {name} has "
                f"{free / 1e9:.2f} GB left after dense weights, KV cache ({need['kv_bytes'] / 1e9:.2f} GB) and "
                f"workspace: short by {short / 1e9:.2f} GB; at most {int(free // m.expert_bytes())} experts of "
                f"{m.expert_bytes() / 2**20:.0f} MiB fit (fewer slots, or --set gpu.memory_gb=...)"
            )
        need["total_bytes"] = base + int(self.expert_cache_bytes)
        return need


def storage_resident_keys(model: ModelSpec, hardware: HardwareSpec, expert_bytes: int | None = None) -> np.ndarray:
    """Bool per key (layer x experts + expert): True when the expert lives on the storage tier
    because host memory (``cpu.memory_gb``) cannot hold every expert. Raises ConfigError when
    some experts do not fit in host memory and there is no storage tier."""
    n = model.num_moe_layers * model.num_experts
    nbytes = model.expert_bytes() if expert_bytes is None else int(expert_bytes)
    host = int(hardware.cpu.memory_gb * 1e9)
    fit = n if nbytes <= 0 else min(n, host // nbytes)
    on_storage = np.zeros(n, dtype=bool)
    on_storage[fit:] = True
    if fit < n and hardware.storage.bandwidth_gbps <= 0:
        raise ConfigError(
            f"the experts ({n * nbytes / 1e9:.1f} GB) do not fit in host memory ({hardware.cpu.memory_gb} GB) "
            f"and there is no storage tier: set --set storage.bandwidth_gbps=7 (NVMe) or a larger cpu.memory_gb"
        )
    return on_storage
