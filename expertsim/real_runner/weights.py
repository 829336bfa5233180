"""The model as real tensors: experts in host memory, a device slot pool, a dense stand-in.

Each routed expert is one contiguous buffer in host memory (pinned on CUDA), so a cache miss is
exactly one host-to-device copy of ``ModelSpec.expert_bytes()`` bytes into a slot of the device
pool. A slot holds the SwiGLU matrices w1 [d_ff, d], w3 [d_ff, d], w2 [d, d_ff] (or w1, w2 for a
two-matrix FFN) as views of one row of the pool.

The dense stand-in is one layer's attention of the spec's shape: RMSNorm, the q/k/v projections,
the KV cache write, attention over the context (grouped-query), the output projection and the
router GEMM. It replaces attention's exact math (no RoPE, no causal mask) with the same GEMMs and
memory traffic, which is what the timing needs.

Expert weights are a random base expert scaled by a per-expert factor (cheap to build for a big
model, and distinct, so a test can tell experts apart); the slot pool starts filled with NaN so
that computing from a slot whose copy has not landed poisons the output.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from expertsim.specs.model import ModelSpec


def expert_scale(key: int) -> float:
    """Per-expert factor of the base weights (distinct for every key, close to 1)."""
    return 1.0 + 0.01 * ((key * 7919) % 97)


def ffn(x: torch.Tensor, row: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """One routed expert's FFN on ``x`` [tokens, d] with the weights in ``row`` (one pool row)."""
    d, f = spec.d_model, spec.d_ff_expert
    w1 = row[: f * d].view(f, d)
    if spec.expert_matrices == 2:
        w2 = row[f * d: 2 * f * d].view(d, f)
        return F.linear(F.relu(F.linear(x, w1)), w2)
    w3 = row[f * d: 2 * f * d].view(f, d)
    w2 = row[2 * f * d: 3 * f * d].view(d, f)
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def expert_numel(spec: ModelSpec) -> int:
    return spec.expert_matrices * spec.d_model * spec.d_ff_expert


class ExpertStore:
    """Every (MoE layer, expert) of the spec in host memory, one row each: [layers*experts, numel]."""

    def __init__(self, spec: ModelSpec, device, dtype: torch.dtype, *, seed: int = 0, pinned: bool = True):
        self.spec = spec
        n = spec.num_moe_layers * spec.num_experts
        numel = expert_numel(spec)
        gen = torch.Generator().manual_seed(seed)
        base = (torch.randn(numel, generator=gen) / math.sqrt(spec.d_model)).to(dtype)
        self.host = device.host_empty((n, numel), dtype, pinned=pinned)
        for key in range(n):
            torch.mul(base, expert_scale(key), out=self.host[key])
        self.row_bytes = numel * self.host.element_size()

    def row(self, key: int) -> torch.Tensor:
        return self.host[key]


class SlotPool:
    """Device memory for the expert cache: ``rows`` expert-sized rows, initially NaN."""

    def __init__(self, spec: ModelSpec, device, dtype: torch.dtype, rows: int):
        self.rows = rows
        self.data = device.empty((max(rows, 1), expert_numel(spec)), dtype)
        self.data.fill_(float("nan"))


class DenseStandIn:
    """Per model layer: attention projections, KV cache and router, on the device."""

    def __init__(self, spec: ModelSpec, device, dtype: torch.dtype, max_context: int, *, seed: int = 1):
        self.spec = spec
        d, hd = spec.d_model, spec.head_dim
        self.heads, self.kv_heads = spec.num_heads, spec.num_kv_heads
        gen = torch.Generator().manual_seed(seed)
        dev = device.torch_device

        def weight(rows, cols):
            return (torch.randn(rows, cols, generator=gen) / math.sqrt(cols)).to(dtype).to(dev)

        self.layers = []
        for _ in range(spec.num_layers):
            self.layers.append({
                "wqkv": weight((self.heads + 2 * self.kv_heads) * hd, d),
                "wo": weight(d, self.heads * hd),
                "router": weight(spec.num_experts, d),
                "k": torch.zeros(max_context, self.kv_heads, hd, dtype=dtype, device=dev),
                "v": torch.zeros(max_context, self.kv_heads, hd, dtype=dtype, device=dev),
            })

    def __call__(self, layer: int, x: torch.Tensor, positions: slice, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the residual stream after this layer's attention and the normalised input of
        the layer's FFN (the router logits are computed, for their cost, and dropped: routing
        comes from the trace)."""
        w = self.layers[layer]
        hd, t = self.spec.head_dim, x.shape[0]
        h = F.rms_norm(x, (x.shape[-1],))
        qkv = F.linear(h, w["wqkv"])
        q = qkv[:, : self.heads * hd].view(t, self.heads, hd)
        k = qkv[:, self.heads * hd: (self.heads + self.kv_heads) * hd].view(t, self.kv_heads, hd)
        v = qkv[:, (self.heads + self.kv_heads) * hd:].view(t, self.kv_heads, hd)
        w["k"][positions] = k
        w["v"][positions] = v
        keys = w["k"][:context].transpose(0, 1).unsqueeze(0)
        values = w["v"][:context].transpose(0, 1).unsqueeze(0)
        attn = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), keys, values,
                                              enable_gqa=self.heads != self.kv_heads)
        x = x + F.linear(attn.squeeze(0).transpose(0, 1).reshape(t, self.heads * hd), w["wo"])
        h = F.rms_norm(x, (x.shape[-1],))
        F.linear(h, w["router"])
        return x, h


def apply_expert(x: torch.Tensor, h: torch.Tensor, rows: np.ndarray, gate: np.ndarray, weights_row: torch.Tensor,
                 spec: ModelSpec) -> None:
    """Add one expert's gated output for its tokens (``rows`` of the pass) to the residual ``x``,
    from the FFN input ``h``. The replay and the calibration both time exactly this."""
    if x.shape[0] == 1:
        x.add_(ffn(h, weights_row, spec), alpha=float(gate[0]))
        return
    idx = torch.as_tensor(rows, device=x.device)
    g = torch.as_tensor(gate, device=x.device).to(x.dtype)
    x.index_add_(0, idx, ffn(h[idx], weights_row, spec) * g[:, None])


def apply_cpu_expert(x: torch.Tensor, h: torch.Tensor, rows: np.ndarray, gate: np.ndarray,
                     host_row: torch.Tensor, spec: ModelSpec) -> None:
    """The same on the host CPU from the host copy of the weights (activations cross the link)."""
    idx = torch.as_tensor(rows, device=x.device)
    xs = h[idx].to("cpu")
    y = ffn(xs, host_row, spec) * torch.as_tensor(gate).to(xs.dtype)[:, None]
    x.index_add_(0, idx, y.to(x.device))


def token_groups(experts: np.ndarray, weights: np.ndarray | None, top_k: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """expert -> (token rows in the pass, gate weight per row) for one layer of one pass."""
    out = {}
    for e in np.unique(experts):
        rows, cols = np.nonzero(experts == e)
        gate = weights[rows, cols] if weights is not None else np.full(len(rows), 1.0 / top_k, dtype=np.float32)
        out[int(e)] = (rows, gate.astype(np.float32))
    return out
