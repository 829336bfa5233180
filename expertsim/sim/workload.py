"""Workload: how a trace's tokens are grouped into iterations (forward passes) for an engine."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from expertsim.policies import AccessPlan
from expertsim.traces import RoutingTrace


@dataclass(frozen=True)
class Iteration:
    """One forward pass over tokens ``start:stop`` of the trace (contiguous, one request at
    batch 1). ``context_tokens`` is the KV length attended to after the pass."""

    index: int
    start: int
    stop: int
    request: int
    phase: int  # 0 prefill, 1 decode
    context_tokens: int

    @property
    def num_tokens(self) -> int:
        return self.stop - self.start


def iterations_batch1(trace: RoutingTrace) -> list[Iteration]:
    """Batch 1: the trace's passes in order (a prefill pass over a prompt, then one pass per
    decode token), one request after another."""
    starts = trace.pass_starts()
    out = []
    for i, (a, b) in enumerate(zip(starts[:-1].tolist(), starts[1:].tolist())):
        out.append(Iteration(index=i, start=a, stop=b, request=int(trace.request[a]),
                             phase=int(trace.phase[a]), context_tokens=int(trace.position[b - 1]) + 1))
    return out


def build_access_plan(trace: RoutingTrace, iterations: list[Iteration], num_experts: int) -> AccessPlan:
    """The lookup order of the LayerServer: iterations, then MoE layers, then the layer's needed
    experts ascending (for oracles such as Belady)."""
    keys = []
    for it in iterations:
        block = trace.experts[it.start:it.stop]
        for layer in range(trace.num_layers):
            needed = np.unique(block[:, layer])
            keys.append(layer * num_experts + needed.astype(np.int64))
    flat = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)
    return AccessPlan(keys=flat, num_experts=num_experts)
