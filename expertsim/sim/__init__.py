"""Simulator: cost model, the SimPy discrete-event engine, workload, metrics and timeline.

Imports without torch, plotly or Ray.
"""
from expertsim.sim.cost import CostModel
from expertsim.sim.engine import SimOptions, Simulation
from expertsim.sim.metrics import RunResult, Timeline
from expertsim.sim.workload import Iteration, build_access_plan, iterations_batch1

__all__ = ["CostModel", "SimOptions", "Simulation", "RunResult", "Timeline", "Iteration",
           "build_access_plan", "iterations_batch1"]
