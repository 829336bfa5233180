"""`expertsim trace ...`: inspect, convert, split and synthesise routing traces."""
from __future__ import annotations

import typer

trace_app = typer.Typer(help="Routing traces: info, import, capture, statistics, synthetic traces.",
                        no_args_is_help=True)


@trace_app.command("info")
def trace_info(path: str = typer.Argument(..., help="A routing trace (.parquet).")) -> None:
    """Shape, phases, requests and metadata of a trace."""
    from expertsim.traces import read_trace

    trace = read_trace(path)
    typer.echo(repr(trace))
    for key, value in sorted(trace.metadata.items()):
        typer.echo(f"  {key}: {value}")
