"""`python -m expertsim.analysis sweep|results|report ...`: the analysis commands on their own
(the same functions `expertsim sweep|results|report` runs)."""
import sys

import typer

from expertsim.analysis.commands import register
from expertsim.errors import ExpertSimError

app = typer.Typer(name="expertsim-analysis", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
register(app)

if __name__ == "__main__":
    try:
        app()
    except ExpertSimError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
