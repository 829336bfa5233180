"""expertsim: trace-driven simulation of Mixture-of-Experts inference with expert offloading."""
__version__ = "0.1.0"
