"""DAOP (arXiv 2501.10375): per-sequence placement at prefill, every other expert on the CPU."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sim"))
from simhelpers import tiny_hardware, tiny_model  # noqa: E402

from expertsim.cli import app  # noqa: E402
from expertsim.policies import CacheConfig, ExpertCache, make_policy  # noqa: E402
from expertsim.sim import SimOptions, Simulation  # noqa: E402
from expertsim.traces import RoutingTrace  # noqa: E402


def _trace():
    """Two requests, one MoE layer pair; request 0's prompt routes mostly to experts 2 and 3,
    request 1's to 0 and 1; decode tokens use one of the prompt's pair and one other expert."""
    rows, req, step, pos, phase = [], [], [], [], []
    for r, hot in ((0, (2, 3)), (1, (0, 1))):
        for p in range(300):
            rows.append([list(hot), list(hot)])
            req.append(r); step.append(0); pos.append(p); phase.append(0)
        other = [e for e in range(4) if e not in hot]
        for d in range(6):
            rows.append([[hot[d % 2], other[d % 2]]] * 2)
            req.append(r); step.append(1 + d); pos.append(300 + d); phase.append(1)
    return RoutingTrace(experts=np.array(rows), request=np.array(req), step=np.array(step),
                        position=np.array(pos), phase=np.array(phase), num_experts=4)


def test_prefill_places_the_sequence_hot_experts_and_decode_misses_run_on_the_cpu():
    trace = _trace()
    sim = Simulation(tiny_model(), tiny_hardware(), make_policy("daop"), CacheConfig(per_layer=2),
                     SimOptions(engine="des"))
    result = sim.run(trace)
    m = result.metrics
    # each request's prefill copies its 2 hot experts per layer (2 layers): 2 x 2 x 2 copies
    assert m["h2d_copies"] == 8 and m["prefetch_copies"] == 8
    # decode: one of each token's experts is the sequence's hot one (a hit), the other on the CPU
    assert m["hit_rate_decode"] == 0.5
    decode_cpu = 2 * 6 * 2  # requests x decode tokens x layers, one CPU expert each
    prefill_cpu = 2 * 2 * 2  # each prefill's two hot experts per layer run on the CPU before placement
    assert m["cpu_experts"] == decode_cpu + prefill_cpu
    assert any("pre-calculation" in a and "not modelled" in a for a in result.assumptions)


def test_sequence_activation_evicts_the_expert_the_sequence_uses_least():
    cache = ExpertCache(1, 4, 10, CacheConfig(per_layer=2), make_policy("sequence-activation").eviction, top_k=1)
    from expertsim.policies.base import RunContext

    policy = cache.eviction
    policy.prepare(RunContext(model=None, hardware=None, cost=None, cache=cache, trace=None, plan=None))
    policy.count[:] = [5, 1, 9, 0]
    assert policy.victim(np.array([0, 1, 2]), tick=1, position=0) == 1


def test_policies_list_shows_daop():
    out = CliRunner().invoke(app, ["policies", "list", "--json"])
    assert out.exit_code == 0, out.output
    assert "daop" in json.dumps(json.loads(out.stdout))
