"""Terminal tables, PNG figures and self-contained HTML pages, drawn from results that are already computed.

`render_analysis(result, folder)` and `render_sweep(result, folder)` write a command's data, figures
and index.html; `summary_table(result)` and `sweep_tables(result)` are the terminal tables.
"""

from .analysis import summary_table
from .html import write_model_index
from .pruning import sweep_tables
from .render import render_analysis, render_sweep

__all__ = ["render_analysis", "render_sweep", "write_model_index", "summary_table", "sweep_tables"]
