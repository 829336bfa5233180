"""The fast engine's two set-Belady kernels (scan for small partitions, heap for large) equal the
reference in expertsim.sim.bounds on random group sequences, per layer and global."""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expertsim.sim import fast
from expertsim.sim.fast import belady, simulate
from expertsim.sim.bounds import belady_misses
from expertsim.sim.workload import AccessPlan

groups_strategy = st.lists(
    st.tuples(st.integers(0, 2), st.sets(st.integers(0, 9), min_size=1, max_size=5)), min_size=1, max_size=60)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(groups=groups_strategy, per_layer=st.booleans(), slots=st.integers(1, 40),
       initial=st.lists(st.integers(0, 29), max_size=12))
def test_set_belady_kernels_equal_reference(groups, per_layer, slots, initial):
    L, E = 3, 10
    keys, steps, start, layer = [], [], [0], []
    for g, (lay, experts) in enumerate(groups):
        for e in sorted(experts):
            keys.append(lay * E + e)
            steps.append(g)
        start.append(len(keys))
        layer.append(lay)
    keys_a = np.array(keys, dtype=np.int64)
    start_a = np.array(start, dtype=np.int64)
    parts = L if per_layer else 1
    gpart = np.array(layer, dtype=np.int64) if per_layer else np.zeros(len(groups), dtype=np.int64)
    init = [] if per_layer else initial  # the engines take initial residents with one global pool
    want = belady_misses(AccessPlan(keys=keys_a, num_experts=E), partitions=parts, slots=slots,
                         initial_residents=init, steps=np.array(steps, dtype=np.int64))
    init_a = np.array(init, dtype=np.int64)
    for kernel in (belady._set_belady_small, belady._set_belady_kernel):
        for impl in ((kernel, kernel.py_func) if fast.HAVE_NUMBA else (kernel,)):
            assert impl(keys_a, start_a, gpart, parts, slots, L * E, init_a) == want, impl


def test_background_call_returns_and_reraises():
    """The bound's replay runs on a second thread: its value comes back, and so does its error."""
    import pytest

    assert simulate._Background(lambda a, b: a + b, 2, 3).result() == 5
    with pytest.raises(ZeroDivisionError):
        simulate._Background(lambda: 1 / 0).result()
