"""What every cache replay shares (the general one in :mod:`expertsim.sim.cache_replay`, the fast
and the streamed ones in :mod:`expertsim.sim.fast`, the one-pass curves in :mod:`expertsim.sim.mrc`):
the option checks, the replay's inputs and its result.

It sits below those modules so that the general replay can hand a run to the fast engine, and
the fast engine can use these, without the two modules importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from expertsim.errors import ConfigError
from expertsim.policies import CacheConfig, System
from expertsim.specs import ModelSpec
from expertsim.traces import RoutingTrace


@dataclass
class CacheReplayResult:
    hits: int
    misses: int
    wall_s: float
    per_layer_hits: np.ndarray
    per_layer_misses: np.ndarray

    @property
    def accesses(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else float("nan")

    def to_dict(self) -> dict:
        return {"hit_rate": self.hit_rate, "hits": self.hits, "misses": self.misses,
                "accesses": self.accesses, "wall_s": self.wall_s}


def replay_view(trace: RoutingTrace, *, phase: str, scope: str, semantics: str) -> RoutingTrace:
    """Check the replay options and keep the phase's tokens (every cache replay: general, fast,
    one-pass miss-ratio curves)."""
    if scope not in ("request", "global"):
        raise ConfigError(f"--scope must be 'request' or 'global', got {scope!r}")
    if semantics not in ("together", "standard"):
        raise ConfigError(f"--semantics must be 'together' or 'standard', got {semantics!r}")
    view = trace.only_phase(phase)
    if view.num_tokens == 0:
        raise ConfigError(f"the trace has no {phase} tokens; use --phase all or prefill")
    return view


def prepare_replay(trace: RoutingTrace, system: System, cache_config: CacheConfig | None, *,
                   model: ModelSpec | None, phase: str, scope: str, semantics: str):
    """Checks and inputs shared by the general and the fast cache replay: the phase's tokens,
    the layer/expert counts (the model's when given), bytes per expert, and the cache size
    (the system's own when it fixes one). Returns (view, num_layers, num_experts, expert_bytes,
    cache_config)."""
    view = replay_view(trace, phase=phase, scope=scope, semantics=semantics)
    num_experts = view.num_experts
    if model is not None:
        view.check_model(model)
        num_experts = model.num_experts
    expert_bytes = model.expert_bytes() if model is not None else 1
    fixed = system.cache_config(model) if model is not None else None
    cache_config = fixed or cache_config
    if cache_config is None:
        raise ConfigError("give a cache size: --per-layer K or --global-slots N")
    return view, view.num_layers, num_experts, expert_bytes, cache_config
