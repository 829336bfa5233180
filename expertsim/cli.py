"""The `expertsim` command. Each area's commands live beside their code; this file assembles them.

Errors that are the user's (bad trace, unknown preset, impossible config) print one clear line
and exit with status 2, never a traceback.
"""
from __future__ import annotations

import json
import sys

import typer

from expertsim.errors import ExpertSimError

app = typer.Typer(
    name="expertsim",
    help=(
        "Trace-driven simulator of Mixture-of-Experts inference with expert offloading.\n\n"
        "Routing traces drive a discrete-event model of the PCIe link, GPU memory and compute, "
        "to compare expert caching, prefetching and token-scheduling policies. "
        "Start with `expertsim compare` (a built-in default study)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

specs_app = typer.Typer(help="Model and hardware presets (TOML shipped with expertsim).", no_args_is_help=True)
app.add_typer(specs_app, name="specs")


def echo_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=False, default=_json_default))


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """A plain aligned text table (units are in the column names)."""
    if not rows:
        typer.echo("(no rows)")
        return
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            if v != v:
                return "-"
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    typer.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    typer.echo("  ".join("-" * w for w in widths))
    for row in cells:
        typer.echo("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))))


@specs_app.command("list")
def specs_list(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the model and hardware presets."""
    from expertsim.specs import list_hardware, list_models, load_hardware, load_model

    models = [load_model(n).summary() for n in list_models()]
    hardware = [load_hardware(n).summary() for n in list_hardware()]
    if as_json:
        echo_json({"models": models, "hardware": hardware})
        return
    typer.echo("Models (expert sizes in the model's dtype; GB = 1e9 bytes):")
    print_table(models)
    typer.echo("\nHardware (link_GBps: effective pinned host-to-device bandwidth):")
    print_table(hardware)


@specs_app.command("show")
def specs_show(name: str = typer.Argument(..., help="A preset name or a path to a .toml file.")) -> None:
    """Show one preset: every field, with its TOML source (and the comments that cite it)."""
    import dataclasses

    from expertsim.specs import list_hardware, list_models, load_hardware, load_model
    from expertsim.specs.loader import _PRESETS

    if name in list_hardware():
        spec = load_hardware(name)
        kind = "hardware"
    else:
        spec = load_model(name)
        kind = "models"
    typer.echo(f"# {type(spec).__name__} {spec.name}")
    for key, value in dataclasses.asdict(spec).items():
        typer.echo(f"{key} = {value}")
    if kind == "models":
        typer.echo(f"# derived: {spec.summary()}")
    preset = _PRESETS / kind / f"{name}.toml"
    if preset.is_file():
        typer.echo(f"\n# --- preset file {name}.toml ---\n" + preset.read_text())


# Command groups that live beside their code (each module imports its heavy dependencies lazily).
from expertsim.traces.commands import trace_app  # noqa: E402

app.add_typer(trace_app, name="trace")


def main() -> None:
    try:
        app()
    except ExpertSimError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
