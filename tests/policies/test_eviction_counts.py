"""The golden table of exact hit and miss counts per built-in eviction policy
(tests/data/eviction_counts.csv, written by ``.venv/bin/python tests/policies/eviction_counts.py``;
what it holds: tests/policies/eviction_counts.py).

Every registered built-in eviction policy must have its rows (a new policy is one class, then the
command above: no list to edit by hand); every ``together`` row must equal both the SimPy DES and
the fast engine; every ``standard`` row the LayerServer replay, the fast kernels and libCacheSim.
"""
from __future__ import annotations

import pytest

import eviction_counts as ec

TABLE = ec.read_table()
TOGETHER = sorted({r["policy"] for r in TABLE if r["semantics"] == "together"})
STANDARD = [r for r in TABLE if r["semantics"] == "standard"]


def test_every_builtin_eviction_policy_has_its_rows():
    """Fails for a registered policy without counts (or counts of a policy that is gone); the
    message names the command that regenerates the table."""
    want = {(name, slots) for name in ec.builtin_eviction_names() for slots in ec.SLOTS}
    have = {(r["policy"], r["slots_per_layer"]) for r in TABLE if r["semantics"] == "together"}
    missing, stale = sorted(want - have), sorted(have - want)
    assert not missing and not stale, (
        f"{ec.TABLE.relative_to(ec.TABLE.parents[2])} is out of date: no rows for {missing}, rows of unknown "
        f"policies or sizes {stale}; regenerate it with `{ec.COMMAND}` (needs the shared traces) and check the diff")
    assert {r["policy"] for r in STANDARD} == set(ec.LIBCACHESIM)
    assert len(TABLE) == len({(r["semantics"], r["policy"], r["slots_per_layer"]) for r in TABLE})


@pytest.fixture(scope="module")
def view(mixtral_trace):
    return ec.trace_slice(mixtral_trace)


@pytest.mark.shared
@pytest.mark.parametrize("policy", TOGETHER)
def test_together_counts_equal_des_and_fast(view, policy):
    for row in (r for r in TABLE if r["semantics"] == "together" and r["policy"] == policy):
        want = (row["hits"], row["misses"])
        slots = row["slots_per_layer"]
        assert sum(want) == 2_816  # 41 passes x 32 layers: the prefill pass's union, then 2 per decode token
        assert ec.together_counts(view, policy, slots, "des") == want, (policy, slots, "des")
        assert ec.together_counts(view, policy, slots, "fast") == want, (policy, slots, "fast")


@pytest.mark.shared
@pytest.mark.parametrize("row", STANDARD, ids=lambda r: f"{r['policy']}-{r['slots_per_layer']}")
def test_standard_counts_equal_des_fast_and_libcachesim(view, row):
    want = (row["hits"], row["misses"])
    policy, slots = row["policy"], row["slots_per_layer"]
    assert sum(want) == 8_192  # 128 tokens x 32 layers x top-2
    assert ec.standard_counts(view, policy, slots, "des") == want
    assert ec.standard_counts(view, policy, slots, "fast") == want
    pytest.importorskip("libcachesim")
    per_layer = [ec.libcachesim_counts(ec.LIBCACHESIM[policy], slots, keys) for keys in ec.layer_streams(view)]
    assert (sum(h for h, _ in per_layer), sum(m for _, m in per_layer)) == want


def test_the_table_orders_policies_as_expected():
    """Belady is optimal for the classic stream: no policy misses less at any size."""
    for slots in ec.SLOTS:
        misses = {r["policy"]: r["misses"] for r in STANDARD if r["slots_per_layer"] == slots}
        assert misses["belady"] == min(misses.values()), slots
