"""The fast replay engine: the built-in policies' exact hit/miss sequence and timing, without SimPy.

The reference engines (the SimPy DES and the general cache replay) drive any policy through the
shared :class:`~expertsim.policies.serve.LayerServer`, one Python call per lookup. For the systems
whose decisions are fixed (the base :class:`~expertsim.policies.System` with LRU or FIFO
eviction, ``no-cache`` and ``all-on-gpu``) the same sequence follows from a few arrays:

- *Access groups* (:mod:`.groups`): for every (pass, MoE layer), the needed experts in ascending
  id order (the LayerServer's lookup order) and how many of the pass's tokens route to each.
  Built in one compiled pass over the routes (numpy without numba).
- *The cache* (:mod:`.lru`): one recency list per cache partition (per layer or one global pool)
  as an intrusive doubly linked list over the keys, with the LayerServer's "together" semantics,
  including the items a too-small cache releases mid-layer.
- *Timing* (:mod:`.timing`): at batch 1 with no prefetch, copies are served first come, first
  served on the single link, computes hits first, then each miss once its copy has landed; all
  durations are integer nanoseconds from the same :class:`~expertsim.sim.cost.CostModel`, so
  totals are equal to the DES's, not just close.

The modules, in reading order:

- :mod:`.jit`: numba when installed (``cache=True``), else plain Python with the same results.
- :mod:`.groups`: :class:`AccessGroups`, :func:`groups_from_passes`, the cache's partitions.
- :mod:`.lru`: the LRU/FIFO kernels (grouped and per-access), :func:`run_lru`.
- :mod:`.belady`: the set-Belady kernels of the link bound, and a max-heap they share.
- :mod:`.timing`: the timing kernels (copies on their own stream, or on the compute stream).
- :mod:`.support`: which systems and run conditions the kernels reproduce exactly
  (:func:`supports_simulation`, :func:`supports_cache_replay`, :func:`run_supported`).
- :mod:`.simulate`: :func:`simulate_fast`, the timed run and its :class:`RunResult`.
- :mod:`.replay`: cache-only replays (:func:`replay_cache_fast`, the streamed
  :func:`replay_parquet_fast`).
- :mod:`.stream`: the classic one-cache stream replay (:func:`replay_stream`; libCacheSim's).
- :mod:`.general`: every other eviction policy: the system's own ExpertCache and LayerServer
  walked once without timing, then the timing kernels.
- :mod:`.plans`, :mod:`.prefetching`, :mod:`.cache_kernels`, :mod:`.link_kernels`: composed
  systems with prefetch, skipped or CPU misses and a static hot set, in one compiled pass (their
  prefetch requests and miss rules planned from the trace first).
- :mod:`.hybrid`: KTransformers and llama.cpp, every layer timed at once.
- :mod:`.stepped`, :mod:`.events`: every other system, the DES's steps without SimPy.

``supports_cache_replay`` and ``supports_simulation`` (here: the LRU/FIFO kernels) refuse anything
these kernels do not reproduce exactly, so callers try the next path;
:func:`expertsim.sim.engine.Simulation.run` tries them in the order above and falls back to the
DES (the reference) for what none reproduces (several copy engines, chunked copies, a storage
tier, a full timeline, a plug-in under ``--engine auto``).
"""
from __future__ import annotations

from expertsim.policies.base import next_use_positions
from expertsim.sim.fast.groups import AccessGroups, groups_from_passes
from expertsim.sim.fast.jit import HAVE_NUMBA
from expertsim.sim.fast.lru import new_lru_state, run_lru
from expertsim.sim.fast.replay import replay_cache_fast, replay_parquet_fast
from expertsim.sim.fast.simulate import simulate_fast
from expertsim.sim.fast.stream import STREAM_POLICIES, replay_stream
from expertsim.sim.fast.support import run_supported, supports_cache_replay, supports_simulation

__all__ = ["HAVE_NUMBA", "AccessGroups", "groups_from_passes", "new_lru_state", "run_lru", "replay_cache_fast",
           "replay_parquet_fast", "simulate_fast", "STREAM_POLICIES", "next_use_positions", "replay_stream",
           "run_supported", "supports_cache_replay", "supports_simulation"]
