"""The compiled access-group builder equals the numpy one (and both the engines' definition)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from expertsim.sim import fast
from expertsim.sim.fast import groups


def reference(experts, pass_starts, num_experts):
    """The definition, one group at a time: per pass and layer, the needed experts ascending,
    each with the number of the pass's routes to it."""
    keys, tokens, start = [], [], [0]
    n, L, k = experts.shape
    for p in range(len(pass_starts) - 1):
        rows = experts[pass_starts[p]:pass_starts[p + 1]]
        for layer in range(L):
            ids, counts = np.unique(rows[:, layer, :], return_counts=True)
            keys += (layer * num_experts + ids).tolist()
            tokens += counts.tolist()
            start.append(len(keys))
    return keys, tokens, start


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), num_experts=st.sampled_from([2, 6, 64, 300]), layers=st.integers(1, 3),
       k=st.integers(1, 4), lengths=st.lists(st.integers(1, 9), min_size=1, max_size=8))
def test_groups_kernel_equals_numpy_and_definition(data, num_experts, layers, k, lengths):
    n = sum(lengths)
    dtype = np.uint8 if num_experts <= 255 else np.int16
    experts = data.draw(arrays(dtype, (n, layers, k), elements=st.integers(0, num_experts - 1)))  # repeats included
    pass_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    want_keys, want_tokens, want_start = reference(experts, pass_starts, num_experts)
    layer = np.tile(np.arange(layers, dtype=np.int64), len(lengths))
    pass_index = np.repeat(np.arange(len(lengths), dtype=np.int64), layers)
    numpy_groups = groups._groups_numpy(experts, pass_starts, num_experts)
    kernels = [groups._groups_kernel.py_func] + ([groups._groups_kernel] if fast.HAVE_NUMBA else [])
    for kernel in kernels:
        keys, tokens, start = kernel(np.ascontiguousarray(experts), pass_starts, num_experts)
        assert keys.tolist() == want_keys and tokens.tolist() == want_tokens and start.tolist() == want_start
    assert numpy_groups.keys.tolist() == want_keys
    assert numpy_groups.tokens.tolist() == want_tokens
    assert numpy_groups.start.tolist() == want_start
    assert numpy_groups.layer.tolist() == layer.tolist() and numpy_groups.pass_index.tolist() == pass_index.tolist()
    got = fast.groups_from_passes(experts, pass_starts, num_experts)
    assert got.keys.tolist() == want_keys and got.layer.tolist() == layer.tolist()
    assert got.pass_index.tolist() == pass_index.tolist()


@pytest.mark.skipif(not fast.HAVE_NUMBA, reason="numba absent")
def test_shared_trace_groups_equal_numpy(mixtral_trace):
    starts = mixtral_trace.pass_starts()
    E = mixtral_trace.num_experts
    L = mixtral_trace.num_layers
    got = fast.groups_from_passes(mixtral_trace.experts, starts, E)
    want = groups._groups_numpy(mixtral_trace.experts, starts, E)
    for name in ("keys", "tokens", "start"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name
    assert len(got.start) == (len(starts) - 1) * L + 1
