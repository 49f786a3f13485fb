"""How the commands write to the terminal, and to a pipe or file.

On a terminal: rich progress bars and tables sized to the window. When stdout is not a
terminal (``lipcert demo > log``): no progress bars, one plain line per finished stage
(its name and seconds), and tables at their full width instead of wrapped at 80 columns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["make_console", "print_table", "stage_line", "stdout_is_terminal"]

PIPE_WIDTH = 10_000  # wide enough that no table is wrapped or cut
_SHORT = {"clean_accuracy": "clean", "robust_accuracy": "robust",
          "certified_accuracy": "certified", "median_radius": "median r",
          "min_margin": "min margin"}


def stdout_is_terminal() -> bool:
    """Whether stdout is a terminal, as rich decides it (``FORCE_TERMINAL`` etc. honoured)."""
    return Console().is_terminal


def make_console(stderr: bool = False) -> Console:
    """A console that never wraps lines; on a pipe or file, one as wide as any table."""
    console = Console(stderr=stderr, soft_wrap=True)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, soft_wrap=True, width=PIPE_WIDTH)


def print_table(console: Console, df: pd.DataFrame, title: str) -> None:
    """``df`` as a rich table, floats to 4 significant digits, long column names shortened."""
    from rich.table import Table

    table = Table(title=title)
    for column in df.columns:
        table.add_column(_SHORT.get(str(column), str(column)))
    for row in df.itertuples(index=False):
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    console.print(table)


def stage_line(name: str, seconds: float, detail: str = "") -> str:
    """The plain line that reports a finished stage: ``name: 12.3 s (detail)``."""
    return f"{name}: {seconds:.1f} s" + (f" ({detail})" if detail else "")

