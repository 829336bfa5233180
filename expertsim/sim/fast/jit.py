"""The fast engine's compiler switch (:mod:`expertsim.jit`, shared with the learned predictors)."""
from expertsim.jit import HAVE_NUMBA, _njit, _njit_inline, map_threads  # noqa: F401
