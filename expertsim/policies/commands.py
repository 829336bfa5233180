"""`expertsim policies ...`: list the registered policies, evaluate a learned predictor.

Registered in the main CLI as ``app.add_typer(policies_app, name="policies")``.
"""
from __future__ import annotations

import inspect
import json
from typing import Literal

import typer

policies_app = typer.Typer(help="Eviction policies and named systems: list them, evaluate predictors.",
                           no_args_is_help=True)


def _parameters(cls: type) -> str:
    sig = inspect.signature(cls.__init__)
    parts = []
    for name, p in sig.parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        parts.append(name if p.default is inspect.Parameter.empty else f"{name}={p.default!r}")
    return ", ".join(parts)


def _summary(cls: type) -> str:
    desc = getattr(cls, "description", "") or ""
    if desc:
        return desc
    doc = inspect.getdoc(cls) or ""
    first = doc.split("\n\n")[0].replace("\n", " ")
    return first.split(". ")[0].rstrip(".")


def policy_rows() -> list[dict]:
    """One row per registered system and part (eviction, prefetch, miss, scheduler): kind, name,
    summary, parameters."""
    from expertsim.policies.registry import PARTS, SYSTEMS, system_names

    rows = []
    for name in system_names():
        cls = SYSTEMS[name]
        oracle = getattr(cls, "oracle", False)
        rows.append({"kind": "system", "name": name, "summary": _summary(cls), "parameters": _parameters(cls),
                     "oracle": oracle if isinstance(oracle, bool) else "when a part is",
                     "runtime": getattr(cls, "runtime", "default")})
    for kind in ("eviction", "prefetch", "miss", "scheduler"):  # system_names() loaded every table
        for name, cls in sorted(PARTS[kind].items()):
            rows.append({"kind": kind, "name": name, "summary": _summary(cls), "parameters": _parameters(cls),
                         "oracle": bool(getattr(cls, "oracle", False))})
    return rows


@policies_app.command("list")
def list_policies(
    plugin: list[str] = typer.Option(None, "--plugin", help="Import a policy plug-in file or module first (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON rows instead of a table."),
) -> None:
    """Named systems (with the runtime each runs on by default) and eviction policies, with one-line
    descriptions and parameters."""
    from expertsim.policies import load_plugin

    for p in plugin or []:
        load_plugin(p)
    rows = policy_rows()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for kind, title in (("system", "Systems (--system NAME)"), ("eviction", "Eviction policies (--policy NAME)"),
                        ("prefetch", "Prefetchers (--system compose --param prefetch=NAME)"),
                        ("miss", "Miss handlers (--system compose --param miss=NAME)"),
                        ("scheduler", "Batch schedulers (--system compose --param scheduler=NAME)")):
        typer.echo(title)
        for r in (r for r in rows if r["kind"] == kind):
            summary = r["summary"] if len(r["summary"]) <= 100 else r["summary"][:99].rstrip() + "…"
            typer.echo(f"  {r['name']:<20} {summary}")
            if r["parameters"]:
                typer.echo(f"  {'':<20} parameters: {r['parameters']}")
            if r.get("runtime"):
                typer.echo(f"  {'':<20} runtime: {r['runtime']}")
        typer.echo("")


@policies_app.command("predictor")
def evaluate_predictor(
    trace: str = typer.Argument(..., help="Routing trace (Parquet)."),
    distance: int = typer.Option(1, "--distance", "-d", min=0, help="Layers ahead (0: whole path before layer 0)."),
    train_fraction: float = typer.Option(0.8, "--train-fraction", help="Fraction of requests to train on."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the request split."),
    predictor_model: Literal["ridge", "logistic"] = typer.Option("ridge", "--predictor-model", help="The predictor's learner: ridge (regression on routing features) or logistic (one classifier per expert). Not the MoE model (--model elsewhere): the trace fixes that."),
    phase: Literal["decode", "prefill", "all"] = typer.Option("decode", "--phase", help="Held-out tokens to score: decode, prefill or all."),
) -> None:
    """Train a learned expert predictor on a split of TRACE's requests and print its precision
    and recall on the held-out requests (JSON)."""
    from expertsim.policies.predictors import RoutePredictor
    from expertsim.traces import read_trace
    from expertsim.traces.ops import split_requests

    tr = read_trace(trace)
    train, held = split_requests(tr, train_fraction, seed=seed)
    model = predictor_model
    pred = RoutePredictor(distances=(distance,) if distance > 0 else (), path=distance == 0, model=model)
    pred.fit(train)
    result = pred.evaluate(held, distance=distance, phase=phase)
    result["per_layer_precision_at_k"] = [round(x, 4) for x in result["per_layer_precision_at_k"]]
    result.update({"trace": trace, "train_requests": train.num_requests, "held_out_requests": held.num_requests,
                   "predictor_model": model, "seed": seed})
    typer.echo(json.dumps({k: (float(v) if hasattr(v, "dtype") else v) for k, v in result.items()}, indent=2))
