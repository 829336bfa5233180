"""A run's setup, shared by both engines: :class:`SimOptions` (how to run) and :class:`RunSetup`
(the checked options, the cache size a system fixes, the cost model, the GPU memory check).

It sits below :mod:`expertsim.sim.engine` (the DES, whose ``Simulation`` is a ``RunSetup``) and
:mod:`expertsim.sim.fast` (which builds a ``RunSetup`` for the same costs and checks), so that
neither engine imports the other's module for them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from expertsim.errors import ConfigError
from expertsim.policies import CacheConfig, System
from expertsim.sim.cost import CostModel, CostProfile, LinkCurve, runtime_for
from expertsim.sim.memory import GpuMemory
from expertsim.sim.batching import ARRIVAL_MODES
from expertsim.specs import HardwareSpec, ModelSpec


@dataclass
class SimOptions:
    scope: str = "global"  # "global": cache persists across requests; "request": emptied per request (batch 1)
    timeline: bool = False  # record every copy/compute/stall
    timeline_iterations: tuple[int, int] | None = None  # record only iterations in [a, b)
    check_memory: bool = True  # fail when dense + KV + cache exceed GPU memory
    # Serving (expertsim.sim.batching): concurrent requests and how they arrive.
    batch: int = 1  # maximum requests per iteration (continuous batching)
    arrival: str = "closed"  # closed | offline | poisson (poisson needs rate_per_s)
    rate_per_s: float | None = None
    arrival_times_ns: tuple[int, ...] | None = None  # explicit arrivals, one per request
    seed: int = 0  # for poisson arrivals
    prefill_chunk_tokens: int | None = None  # chunked prefill: at most this many prompt tokens per request per iteration
    # Link: split copies into chunks of this many bytes (None: whole expert per copy).
    copy_chunk_bytes: int | None = None
    # How queued copies are served: "priority" (demand copies before queued prefetches; an evicted
    # prefetch that has not started is dropped) or "fifo" (issue order, nothing dropped: one CUDA
    # copy stream, as the real runner drives it; what `expertsim validate` predicts with).
    link_queue: str = "priority"
    # Cost sources: a calibrated profile (JSON, see cost.py) and a size-dependent link curve.
    profile: str | None = None
    link_curve: dict | None = None  # {"bytes": [...], "gbps": [...]}
    # The software stack (expertsim.specs.runtime): a RuntimeSpec, a preset name or a TOML path;
    # None = the system's own runtime (a named system's released stack; "default" otherwise).
    runtime: object = None
    bounds: bool = True  # compute the compute-only and link bounds after the run
    # des | fast | auto: "auto" (as the CLI) runs the fast engine (expertsim.sim.fast) where it
    # reproduces the DES exactly, else the DES.
    engine: str = "auto"

    def serving_summary(self) -> dict:
        """The serving settings a result reports (both engines)."""
        return {"batch": self.batch, "arrival": "timestamps" if self.arrival_times_ns else self.arrival,
                "rate_per_s": self.rate_per_s, "prefill_chunk_tokens": self.prefill_chunk_tokens,
                "copy_chunk_bytes": self.copy_chunk_bytes}

    def validate(self) -> None:
        if self.scope not in ("global", "request"):
            raise ConfigError(f"scope must be 'global' or 'request', got {self.scope!r}")
        if not isinstance(self.batch, (int, np.integer)) or self.batch < 1:
            raise ConfigError(f"--batch must be an integer >= 1, got {self.batch!r}")
        if self.scope == "request" and self.batch > 1:
            raise ConfigError("scope 'request' (cache emptied per request) needs batch 1; use scope 'global'")
        if self.arrival not in ARRIVAL_MODES:
            raise ConfigError(f"arrival must be one of {', '.join(ARRIVAL_MODES)}, got {self.arrival!r}")
        if self.engine not in ("des", "fast", "auto"):
            raise ConfigError(f"engine must be des, fast or auto, got {self.engine!r}")
        if self.copy_chunk_bytes is not None and self.copy_chunk_bytes <= 0:
            raise ConfigError(f"copy chunk must be > 0 bytes, got {self.copy_chunk_bytes!r}")
        if self.link_queue not in ("priority", "fifo"):
            raise ConfigError(f"link queue must be 'priority' or 'fifo', got {self.link_queue!r}")


@dataclass
class RunSetup:
    """What one configuration needs before any engine runs: the options checked, the system's
    fixed cache size, the runtime and the cost model (a calibrated profile read once), and the
    GPU memory check. :class:`~expertsim.sim.engine.Simulation` is one; the fast engine builds one
    for the same costs and checks."""

    model: ModelSpec
    hardware: HardwareSpec
    system: System
    cache_config: CacheConfig | None = None
    options: SimOptions = field(default_factory=SimOptions)

    def __post_init__(self) -> None:
        fixed = self.system.cache_config(self.model)
        if fixed is not None:
            self.cache_config = fixed
        # cache_config None: the system's default, sized in run() once the trace's longest
        # request (its KV cache) is known.
        self.options.validate()
        profile = CostProfile.load(self.options.profile, self.model) if self.options.profile else None
        curve = LinkCurve.from_dict(self.options.link_curve) if self.options.link_curve else None
        self.runtime = runtime_for(self.system, self.options.runtime)
        self.cost = CostModel(self.model, self.hardware, profile=profile, link_curve=curve, runtime=self.runtime)

    # --- memory ---------------------------------------------------------------------------
    def gpu_memory(self) -> GpuMemory:
        m = self.model
        cache_bytes = self.cache_config.capacity_bytes(m.num_moe_layers, m.num_experts, m.expert_bytes())
        return GpuMemory(m, self.hardware, cache_bytes,
                         ignores_capacity=getattr(self.system, "ignores_capacity", False))

    def memory_check(self, max_context_tokens: int) -> dict:
        """GPU memory in bytes: dense weights + KV at the longest context + workspace + cache."""
        memory = self.gpu_memory()
        if not self.options.check_memory:
            need = {"dense_bytes": self.model.dense_bytes, "kv_bytes": memory.kv_bytes(max_context_tokens),
                    "workspace_bytes": memory.workspace_bytes, "expert_cache_bytes": memory.expert_cache_bytes}
            need["total_bytes"] = sum(need.values())
            return need
        return memory.check(max_context_tokens)
