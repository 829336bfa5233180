"""Mutated trace files never crash expertsim (issue 13): every outcome is a valid result or the
project's own error. A bounded share of the fuzzing for CI; benchmarks/fuzz_traces.py runs it
long and BENCHMARKS.md has its figure."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expertsim.traces import trace_to_frame, write_trace
from trace_fuzz import base_trace, mutate, outcome

BASE = trace_to_frame(base_trace())


def test_the_unmutated_trace_is_ok(tmp_path):
    path = write_trace(base_trace(), tmp_path / "base.parquet")
    assert outcome(path) == ("ok", "")


@settings(max_examples=250, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(rnd=st.randoms(use_true_random=False))
def test_mutated_traces_give_a_result_or_our_error(rnd, tmp_path):
    mutant = mutate(rnd, base=BASE)
    path = tmp_path / "mutant.parquet"
    path.write_bytes(mutant.data)
    kind, detail = outcome(path)
    assert kind in ("ok", "rejected"), (kind, detail, mutant.ops)


def test_the_fuzzer_reaches_both_outcomes(tmp_path):
    """The mutations are neither all fatal nor all harmless (else the fuzz test proves little)."""
    import random

    kinds = set()
    for seed in range(60):
        path = tmp_path / f"m{seed}.parquet"
        path.write_bytes(mutate(random.Random(seed), base=BASE).data)
        kinds.add(outcome(path)[0])
    assert kinds == {"ok", "rejected"}
