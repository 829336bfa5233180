"""The compiler switch of the fast engine and the learned predictors: numba when it is installed
(the ``fast`` extra), else the kernels run as plain Python over numpy arrays, with the same
results, slower.

Every kernel is compiled with ``cache=True`` (the machine code is kept next to the source in
``__pycache__`` and reused by later processes) and ``nogil=True`` (so the bound's Belady replay
can run on a second thread, see :mod:`expertsim.sim.fast.simulate`). numba compiles a kernel at
its first call, so importing a module of kernels costs little; a run loads only the kernels it calls.
"""
from __future__ import annotations

try:  # numba is optional: the `fast` extra
    import numba

    HAVE_NUMBA = True
    _njit = numba.njit(cache=True, nogil=True)
    objmode = numba.objmode  # a block of a kernel that calls back into Python
    _njit_gil = numba.njit(cache=True)  # for a kernel with an objmode block (it holds the GIL)
except ImportError:  # pragma: no cover - exercised where numba is absent
    HAVE_NUMBA = False

    def _njit(func):
        return func

    _njit_gil = _njit

    def objmode(**types):
        import contextlib

        return contextlib.nullcontext()

if HAVE_NUMBA:
    _njit_inline = numba.njit(cache=True, nogil=True, inline="always")
else:  # pragma: no cover
    def _njit_inline(func):
        return func


def map_threads(fn, items) -> list:
    """``[fn(x) for x in items]``, in that order, on up to as many threads as this process may
    run on at once (at most 8) when the kernels are compiled: they release the GIL (``nogil``),
    so work that is mostly kernel calls (a predictor's layer pairs) runs side by side. Each
    item's result is what it would be alone; without numba, one thread."""
    items = list(items)
    workers = min(len(items), _cpus(), 8) if HAVE_NUMBA else 1
    if workers <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def _cpus() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1
