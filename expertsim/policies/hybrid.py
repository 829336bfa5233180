"""Hybrid CPU/GPU systems: routed experts computed where their weights live (issue 17).

Most people who run a large MoE on one workstation keep the routed experts in host memory and
compute them on the CPU; the GPU holds attention, the KV cache, the router, the shared expert and
optionally some experts. A large batch (a long prompt) instead streams the CPU-resident experts to
the GPU, layer by layer, when the GPU has room for one layer's experts. Two systems:

- ``ktransformers`` (kvcache-ai/ktransformers): ``gpu_experts_per_layer`` experts of every MoE
  layer resident on the GPU (``--kt-num-gpu-experts``), the rest computed on the CPU by its
  AVX-512/AMX kernels beside the GPU's work; a pass of at least ``gpu_prefill_token_threshold``
  tokens prefills layer by layer on the GPU (``--kt-gpu-prefill-token-threshold``, default 4096
  in kt-kernel/python/cli/commands/run.py:447), the layer's experts written into one temporary GPU
  layer before its compute starts (no copy/compute overlap inside the layer).
- ``llamacpp`` (ggml-org/llama.cpp): ``--n-cpu-moe N`` keeps the expert tensors
  (``blk.i.ffn_{gate,up,down}_exps``) of the first ``n_cpu_moe`` model layers in host memory
  (``-ot exps=CPU`` = all of them, the default here); the GPU backend's ``offload_op`` runs a
  MUL_MAT_ID with a batch of at least 32 tokens on the GPU, copying the weights first
  (``ggml_backend_cuda_device_offload_op``: ``min_batch_size = 32``), else the CPU backend computes it;
  graph splits run one after another (no CPU/GPU overlap).

Mechanisms (timed by the DES in :mod:`expertsim.sim.engine` with :mod:`expertsim.sim.cost`):
a CPU-resident expert is ``MissAction.CPU``, and the system asks for ``cpu_per_layer`` (a layer's CPU
experts as one host job, activations crossing the link once each way, memory-bound at decode on
``cpu.memory_bandwidth_gbps`` x the runtime's ``cpu_bandwidth_fraction`` x the NUMA scale,
compute-bound at prefill); a streamed expert is ``MissAction.STREAM`` (the layer's streamed bytes in
one copy, every streamed expert's GPU compute after it). GPU-resident experts are preloaded,
never evicted (the cache is exactly their slots). Approximation: a stream copies the experts the
pass uses, not the whole layer tensor (with >= 32 tokens x top-k nearly every expert is used).
"""
from __future__ import annotations

import numpy as np

from expertsim.errors import PolicyError
from expertsim.policies.base import LayerDecision, LayerObservation, MissAction, RunContext, System, \
    free_expert_memory_bytes
from expertsim.policies.cache import CacheConfig
from expertsim.policies.eviction import LRU, hottest
from expertsim.policies.registration import register_system


class HybridSystem(System):
    """The common part: a fixed GPU-resident expert set, CPU compute for the rest, streaming to
    the GPU for passes of at least ``stream_min_tokens`` tokens when one layer's streamed experts
    fit in the GPU memory left (else the CPU computes them: the stack cannot allocate the staging
    layer)."""

    cpu_per_layer = True  # the engine runs a layer's CPU experts as one host job
    stream_min_tokens = 1 << 62

    def __init__(self):
        super().__init__(LRU())
        self._resident: np.ndarray | None = None
        self.stream_ok_ = True
        self.staging_bytes_ = 0

    # --- placement (subclasses) ---------------------------------------------------------
    def resident_keys(self, model, counts: np.ndarray | None) -> np.ndarray:
        """The GPU-resident keys given per-key use counts of the run's trace (None: before the
        trace is known). Abstract: each hybrid system places its own experts."""
        raise NotImplementedError  # abstract: KTransformers and llama.cpp each define it

    def cache_config(self, model):
        return CacheConfig(global_slots=int(len(self.resident_keys(model, None))))

    def initial_residents(self, model) -> np.ndarray:
        return self._resident if self._resident is not None else self.resident_keys(model, None)

    def prepare(self, ctx: RunContext) -> None:
        super().prepare(ctx)
        m = ctx.model
        counts = None
        if ctx.trace is not None:
            counts = np.zeros(m.num_moe_layers * m.num_experts, dtype=np.int64)
            keys = (np.arange(m.num_moe_layers)[None, :, None] * m.num_experts
                    + ctx.trace.experts.astype(np.int64))
            counts += np.bincount(keys.ravel(), minlength=len(counts))
        self._resident = np.sort(self.resident_keys(m, counts))
        per_layer = np.bincount(self._resident // m.num_experts, minlength=m.num_moe_layers)
        self.staging_bytes_ = int((m.num_experts - per_layer.min()) * m.expert_bytes())
        if ctx.hardware is not None and self.stream_min_tokens < (1 << 62):
            context = int(ctx.trace.position.max()) + 1 if ctx.trace is not None and ctx.trace.num_tokens else 1
            free = free_expert_memory_bytes(m, ctx.hardware, context) - len(self._resident) * m.expert_bytes()
            self.stream_ok_ = self.staging_bytes_ <= free

    def trace_notes(self, trace) -> list[str]:
        """The run's printed assumptions (after prepare): whether large passes could stream."""
        notes = super().trace_notes(trace)
        if not self.stream_ok_:
            notes.append(f"{self.label}: one layer's CPU-resident experts ({self.staging_bytes_ / 1e9:.2f} GB) do "
                         f"not fit in the GPU memory left, so large passes compute them on the CPU too "
                         f"(no streamed prefill)")
        return notes

    def on_layer(self, obs: LayerObservation) -> LayerDecision:
        stream = self.stream_ok_ and obs.experts.shape[0] >= self.stream_min_tokens
        action = MissAction.STREAM if stream else MissAction.CPU
        return LayerDecision(miss_actions={int(e): action for e in obs.needed[~obs.resident].tolist()})


@register_system("ktransformers")
class KTransformers(HybridSystem):
    """KTransformers (kvcache-ai/ktransformers; Chen et al., SOSP'25): routed experts on the CPU
    (AVX-512/AMX kernels) except ``gpu_experts_per_layer`` per layer resident on the GPU (the
    most used ones, ``placement = "frequency"``, or experts 0..N-1, ``"first"``); CPU experts run
    beside the GPU's resident experts; passes of at least ``gpu_prefill_token_threshold`` tokens
    stream each layer's experts to the GPU (layerwise prefill)."""

    description = "CPU experts (AVX-512/AMX) + N GPU experts per layer; layerwise GPU prefill above a threshold"
    runtime = "ktransformers"

    def __init__(self, gpu_experts_per_layer: int = 0, gpu_prefill_token_threshold: int = 4096,
                 placement: str = "frequency"):
        if gpu_experts_per_layer < 0:
            raise PolicyError(f"ktransformers: gpu_experts_per_layer must be >= 0, got {gpu_experts_per_layer}")
        if gpu_prefill_token_threshold < 1:
            raise PolicyError("ktransformers: gpu_prefill_token_threshold must be >= 1 token, got "
                              f"{gpu_prefill_token_threshold} (a huge value turns layerwise prefill off)")
        if placement not in ("frequency", "first"):
            raise PolicyError(f"ktransformers: placement must be 'frequency' or 'first', got {placement!r}")
        super().__init__()
        self.gpu_experts_per_layer = int(gpu_experts_per_layer)
        self.gpu_prefill_token_threshold = int(gpu_prefill_token_threshold)
        self.placement = placement
        self.stream_min_tokens = self.gpu_prefill_token_threshold

    def params(self) -> dict:
        return {"gpu_experts_per_layer": self.gpu_experts_per_layer,
                "gpu_prefill_token_threshold": self.gpu_prefill_token_threshold, "placement": self.placement}

    def resident_keys(self, model, counts):
        n = min(self.gpu_experts_per_layer, model.num_experts)
        keys = []
        for layer in range(model.num_moe_layers):
            if counts is None or self.placement == "first":
                best = np.arange(n)
            else:
                best = hottest(counts[layer * model.num_experts:(layer + 1) * model.num_experts], n)
            keys.append(layer * model.num_experts + best)
        return np.concatenate(keys).astype(np.int64) if keys else np.zeros(0, dtype=np.int64)


@register_system("llamacpp")
class LlamaCpp(HybridSystem):
    """llama.cpp (ggml-org/llama.cpp) with ``--n-cpu-moe N``: the experts of the first ``n_cpu_moe``
    model layers in host memory (-1: every layer, ``-ot exps=CPU``), the others' on the GPU; a
    micro-batch of at least ``min_offload_batch`` tokens copies the CPU experts it uses to the GPU
    (op offload), smaller ones compute them on the CPU; no CPU/GPU overlap."""

    description = "experts of the first n_cpu_moe layers on the CPU; batches >= 32 tokens stream them to the GPU"
    runtime = "llamacpp"

    def __init__(self, n_cpu_moe: int = -1, min_offload_batch: int = 32):
        if n_cpu_moe < -1:
            raise PolicyError(f"llamacpp: n_cpu_moe must be >= 0 layers, or -1 for all, got {n_cpu_moe}")
        if min_offload_batch < 1:
            raise PolicyError(f"llamacpp: min_offload_batch must be >= 1 token, got {min_offload_batch}")
        super().__init__()
        self.n_cpu_moe = int(n_cpu_moe)
        self.min_offload_batch = int(min_offload_batch)
        self.stream_min_tokens = self.min_offload_batch

    def params(self) -> dict:
        return {"n_cpu_moe": self.n_cpu_moe, "min_offload_batch": self.min_offload_batch}

    def resident_keys(self, model, counts):
        if self.n_cpu_moe < 0:
            return np.zeros(0, dtype=np.int64)
        gpu_layers = [i for i, layer in enumerate(model.moe_layers) if layer >= self.n_cpu_moe]
        keys = [i * model.num_experts + np.arange(model.num_experts) for i in gpu_layers]
        return np.concatenate(keys).astype(np.int64) if keys else np.zeros(0, dtype=np.int64)
