"""Workload: how a trace's tokens are grouped into iterations (forward passes) for an engine.

At batch 1 an iteration is one pass of one request, a contiguous block ``start:stop`` of the
trace. Under continuous batching (:mod:`expertsim.sim.batching`) an iteration gathers the next
pass (or prefill chunk) of several requests, so its tokens are a list of trace rows
(``token_index``); ``rows`` indexes the trace arrays either way.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from expertsim.policies import AccessPlan
from expertsim.traces import RoutingTrace


@dataclass(frozen=True, eq=False)
class Iteration:
    """One forward pass over trace tokens ``start:stop`` (batch 1: contiguous, one request), or
    over the rows ``token_index`` of several requests (continuous batching).

    ``context_tokens`` is the KV length attended to after the pass, summed over the iteration's
    requests; ``request`` is the (first) request; ``phase`` is 0 when any token is a prefill
    token, else 1. ``requests``, ``request_tokens`` and ``request_contexts`` give, per request
    of a batched iteration, its id, its new tokens and its KV length after the pass."""

    index: int
    start: int
    stop: int
    request: int
    phase: int  # 0 prefill, 1 decode
    context_tokens: int
    token_index: np.ndarray | None = None
    requests: tuple[int, ...] = ()
    request_tokens: tuple[int, ...] = ()
    request_contexts: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        return self.stop - self.start if self.token_index is None else len(self.token_index)

    @property
    def rows(self) -> slice | np.ndarray:
        """Index into the trace's per-token arrays."""
        return slice(self.start, self.stop) if self.token_index is None else self.token_index

    @property
    def tokens(self) -> np.ndarray:
        """The iteration's trace token indices."""
        return np.arange(self.start, self.stop) if self.token_index is None else self.token_index

    @property
    def num_requests(self) -> int:
        return max(len(self.requests), 1)

    @property
    def attention_pairs(self) -> int | None:
        """Sum over requests of new tokens x context (the attention FLOPs' factor); None for a
        single request (the cost model then uses tokens x context_tokens)."""
        if len(self.requests) <= 1:
            return None
        return int(sum(t * c for t, c in zip(self.request_tokens, self.request_contexts)))


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
    offsets = np.arange(trace.num_layers, dtype=np.int64)[:, None] * num_experts
    for it in iterations:
        block = trace.experts[it.rows].astype(np.int64)  # [tokens, layers, k]
        # Needed experts per layer, ascending, as keys: one bincount for all layers at once.
        used = np.zeros((trace.num_layers, num_experts), dtype=bool)
        layer_idx = np.broadcast_to(np.arange(trace.num_layers)[None, :, None], block.shape)
        used[layer_idx.ravel(), block.ravel()] = True
        keys.append((offsets + np.arange(num_experts)[None, :])[used])
    flat = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)
    return AccessPlan(keys=flat, num_experts=num_experts)
