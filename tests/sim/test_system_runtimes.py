"""Every named system runs on the stack it was released with (issue 12): its runtime preset exists
and cites a source, plain policies stay on the roofline alone, the stack changes the time and not
the algorithm, and the README's table says which runtime each system has."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from simhelpers import synthetic_trace, tiny_hardware, tiny_model

from expertsim.policies import CacheConfig, make_policy
from expertsim.policies.registration import SYSTEMS
from expertsim.policies.registry import eviction_names, system_names
from expertsim.sim import SimOptions, Simulation
from expertsim.sim.cost import runtime_for
from expertsim.specs import list_runtimes, load_runtime

README = Path(__file__).resolve().parents[2] / "README.md"
# Not released systems but the two ends of the scale: they keep the roofline alone.
BASELINES = {"no-cache", "all-on-gpu", "compose"}  # no released stack: the roofline (compose: any runtime with --runtime)


def builtin_systems() -> list[str]:
    return [n for n in system_names() if SYSTEMS[n].__module__.startswith("expertsim.")]


@pytest.mark.parametrize("name", builtin_systems())
def test_each_builtin_system_resolves_to_a_preset_with_a_source(name):
    spec = runtime_for(make_policy(name))
    assert spec.name == SYSTEMS[name].runtime
    assert spec.name in list_runtimes()
    assert load_runtime(spec.name) == spec
    assert spec.source.strip(), f"runtime {spec.name} of {name} has no source"
    if name in BASELINES:
        assert spec.name == "default"
    else:
        assert spec.name != "default", f"{name} runs on the roofline alone, not on its released stack"


def test_plain_policies_keep_the_default_runtime():
    for name in eviction_names():
        assert runtime_for(make_policy(name)).name == "default", name


def _run(name, runtime):
    cache = None if name in BASELINES | {"se-moe", "fiddler"} else CacheConfig(per_layer=2)
    trace = synthetic_trace(num_requests=8, prompt=3, decode=6)  # daop re-places (evicts) by request 8
    return Simulation(tiny_model(), tiny_hardware(), make_policy(name), cache,
                      SimOptions(runtime=runtime)).run(trace).metrics


@pytest.mark.parametrize("name", [n for n in builtin_systems() if n not in BASELINES])
def test_the_stack_changes_the_time_not_the_decisions(name):
    own, roofline = _run(name, None), _run(name, "default")
    # ExpertFlow's prefetch distance adapts to observed stalls, so its copies may follow the time.
    if name != "expertflow":
        for key in ("hits", "misses", "cpu_experts"):
            assert own[key] == roofline[key], key
        # The same copies are asked for; a queued background copy may be cancelled on one stack
        # and issued on the other (cache-moe's copies wait behind kernels on the compute stream).
        assert own["h2d_copies"] + own["cancelled_prefetches"] == \
            roofline["h2d_copies"] + roofline["cancelled_prefetches"]
    spec = runtime_for(make_policy(name))
    if spec.host_us_per_layer > 0 or spec.kernel_us_per_layer > 0:
        assert own["total_s"] > roofline["total_s"]
    elif (spec.copy_stream, spec.writeback, spec.pinned_host, spec.cpu_bandwidth_fraction,
          spec.cpu_flops_fraction) == ("copy", False, None, 1.0, 1.0):
        assert own["total_s"] == pytest.approx(roofline["total_s"], rel=1e-9)  # the roofline's mechanisms
    else:
        assert own["total_s"] >= roofline["total_s"]
    if spec.writeback:  # every evicted expert goes home over the link
        assert own["d2h_gb"] > 0 and roofline["d2h_gb"] == 0
    else:
        assert own["d2h_gb"] == roofline["d2h_gb"]


def test_readme_table_names_each_systems_runtime():
    text = README.read_text()
    start = text.index("Runtime of each named system")
    rows = {}
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells[0] != "system":
                rows[re.sub(r"[`*]", "", cells[0])] = re.sub(r"[`*]", "", cells[1])
        elif rows and not line.startswith("|"):
            break
    assert set(rows) == set(builtin_systems())
    for name, runtime in rows.items():
        assert runtime == SYSTEMS[name].runtime, name


def test_cli_lists_each_systems_runtime_and_every_preset():
    import json

    from typer.testing import CliRunner

    from expertsim.cli import app

    result = CliRunner().invoke(app, ["policies", "list", "--json"])
    assert result.exit_code == 0, result.stdout
    rows = {r["name"]: r for r in json.loads(result.stdout) if r["kind"] == "system"}
    for name in builtin_systems():
        assert rows[name]["runtime"] == SYSTEMS[name].runtime
    listing = CliRunner().invoke(app, ["specs", "list"])
    assert listing.exit_code == 0
    names = {line.split()[0] for line in listing.stdout.split("Runtimes", 1)[1].splitlines()[3:] if line.strip()}
    assert {SYSTEMS[n].runtime for n in builtin_systems()} <= names
    shown = CliRunner().invoke(app, ["specs", "show", "daop"])
    assert shown.exit_code == 0 and "writeback = True" in shown.stdout and "modeling_daop.py" in shown.stdout
