"""Simulator: cost model, the SimPy discrete-event engine, workload, metrics and timeline; the
cache-only replay and one-pass LRU miss-ratio curves.

Imports without torch, plotly or Ray (and without numba: ``lru_mrc`` loads the fast engine's
kernels on first use).
"""
from expertsim.sim.cache_replay import replay_cache
from expertsim.sim.cost import CostModel
from expertsim.sim.engine import Simulation
from expertsim.sim.metrics import RunResult, Timeline
from expertsim.sim.setup import SimOptions
from expertsim.sim.workload import Iteration, build_access_plan, iterations_batch1

__all__ = ["CostModel", "SimOptions", "Simulation", "RunResult", "Timeline", "Iteration",
           "build_access_plan", "iterations_batch1", "replay_cache", "lru_mrc"]


def __getattr__(name: str):
    if name == "lru_mrc":  # the curves need the fast engine's (numba) kernels: load them when asked
        from expertsim.sim.mrc import lru_mrc

        return lru_mrc
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
