"""What the fast engine reproduces exactly: the built-in systems it runs (their classes and
hooks) and the run conditions (options, runtime, link, storage); anything else is left to the
reference engines.
"""
from __future__ import annotations

import dataclasses

from expertsim.errors import ConfigError

# The System hooks the engines call, and which of them each built-in system may override with
# the behaviour the kernels reproduce. A system whose class overrides any other hook (say, a
# reload of its residents at each request) is left to the reference engines.
SYSTEM_HOOKS = ("prepare", "on_request_start", "select_batch", "on_layer", "on_layer_end", "initial_residents",
                "cache_config")
_OVERRIDES = {"lru": (), "fifo": (), "no-cache": ("cache_config", "on_layer_end"),
              "all-on-gpu": ("cache_config", "initial_residents")}



def _builtin_kind(system) -> str | None:
    """'lru' / 'fifo' (the base System with LRU or FIFO eviction), 'no-cache', 'all-on-gpu', or
    None when the fast engine does not reproduce the system (any other class, subclasses
    included, or a built-in class whose hooks changed)."""
    from expertsim.policies.base import System
    from expertsim.policies.eviction import FIFO, LRU
    from expertsim.policies.systems import AllOnGpu, NoCache

    eviction = type(getattr(system, "eviction", None))
    kind = None
    if type(system) is System and eviction in (LRU, FIFO):
        kind = "lru" if eviction is LRU else "fifo"
    elif type(system) is NoCache and eviction is LRU:
        kind = "no-cache"
    elif type(system) is AllOnGpu and eviction is LRU:
        kind = "all-on-gpu"
    if kind is None:
        return None
    for hook in SYSTEM_HOOKS:
        if hook not in _OVERRIDES[kind] and getattr(type(system), hook) is not getattr(System, hook):
            return None
    return kind


def supports_cache_replay(system, cache_config, semantics: str = "together") -> bool:
    """True when :func:`replay_cache_fast` reproduces the general replay exactly."""
    if semantics not in ("together", "standard"):
        return False
    kind = _builtin_kind(system)
    if kind is None:
        return False
    if cache_config is None:
        return kind in ("no-cache", "all-on-gpu")  # they fix their own size when a model is given
    return True


# SimOptions fields the fast engine reproduces at any value, and the values it reproduces for
# the others; a field not listed here (a new option) must be at its default.
_ANY_VALUE = {"scope", "check_memory", "engine", "bounds", "profile", "link_curve", "prefill_chunk_tokens",
              "timeline_iterations", "seed", "rate_per_s",
              "link_queue",  # the systems it runs copy on demand only: in issue order either way
              "runtime"}  # checked below: host times fold into the cost model, copy semantics do not
_ALLOWED = {"batch": (1,), "arrival": ("closed", "offline"), "timeline": (False,),
            "arrival_times_ns": (None,), "copy_chunk_bytes": (None,)}



def supports_simulation(system, cache_config, options, *, model=None, hardware=None) -> bool:
    """True when :func:`simulate_fast` reproduces the SimPy engine exactly: the base System with
    LRU or FIFO, no-cache or all-on-gpu; batch 1 with closed or offline arrivals (chunked prefill
    allowed); whole-expert copies; no timeline; any cost profile or link curve. With
    ``hardware`` (and ``model``) also checks the link (one copy engine) and that every expert
    lives in host memory (no storage tier reads)."""
    return _builtin_kind(system) is not None and run_supported(system, cache_config, options, model=model,
                                                                hardware=hardware)


def run_supported(system, cache_config, options, *, model=None, hardware=None, writeback: bool = False) -> bool:
    """The run-level half of :func:`supports_simulation` (options, runtime, link, storage),
    shared with the general eviction pass (:mod:`expertsim.sim.fast.general`). ``writeback``:
    the caller's kernel also writes evicted experts back (a write-back runtime)."""
    from expertsim.sim.cost import runtime_for

    runtime = runtime_for(system, options.runtime)
    if not runtime.fast_engine_ok and not (writeback and runtime.writeback):
        return False
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if f.name in _ANY_VALUE:
            continue
        if f.name in _ALLOWED:
            if value not in _ALLOWED[f.name]:
                return False
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            return False
        if value != default:
            return False
    if model is not None and cache_config is not None and cache_config.per_layer is not None \
            and cache_config.per_layer < model.top_k:
        return False  # fewer slots than top-k: experts stream through the slots (the DES's serve order)
    if hardware is not None:
        if hardware.link.copy_engines != 1:
            return False
        if model is not None:
            from expertsim.sim.memory import storage_resident_keys

            try:
                if storage_resident_keys(model, hardware).any():
                    return False
            except ConfigError:
                return False
    return True
