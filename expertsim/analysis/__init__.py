"""Analysis: study files and sweeps (local processes or Ray), polars result tables, plotly figures
and self-contained HTML reports. Imports plotly, polars and Ray lazily."""
