"""The one way kvmkit prints for people: ``rich`` tables, progress and ``--json``.

- :func:`print_table` draws a :class:`rich.table.Table`; when stdout is not a terminal,
  rich degrades it to plain aligned text (no colour, no box-drawing surprises in pipes).
- :func:`print_json` is the one ``--json`` writer (sorted keys off, indent 2, a final
  newline, non-finite floats written as ``null`` so the output is strict JSON).
- :func:`progress` is a live progress display on a terminal and one line per task
  elsewhere.
- :data:`err_console` is for messages that must not mix with data on stdout.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.table import Table

err_console = Console(stderr=True, highlight=False)


def stdout_console() -> Console:
    """A console on the current ``sys.stdout`` (tests swap it; so ask each time)."""
    return Console(file=sys.stdout, highlight=False, soft_wrap=False)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:,.2f}" if abs(value) < 1e6 else f"{value:.3g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def make_table(
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    title: str | None = None,
    numeric: Sequence[str] = (),
) -> Table:
    """A rich table; columns named in ``numeric`` are right-aligned."""
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for name in columns:
        table.add_column(name, justify="right" if name in numeric else "left", overflow="fold")
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    return table


def print_table(
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    title: str | None = None,
    numeric: Sequence[str] = (),
    console: Console | None = None,
) -> None:
    """Print one table (see :func:`make_table`) on stdout, or on ``console``."""
    (console or stdout_console()).print(make_table(columns, rows, title=title, numeric=numeric))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def to_json(data: Any) -> str:
    """Strict JSON text for ``data`` (NaN and infinities become ``null``)."""
    return json.dumps(_finite(data), indent=2, default=str, allow_nan=False)


def print_json(data: Any) -> None:
    """The one ``--json`` writer: strict JSON on stdout, newline-terminated."""
    sys.stdout.write(to_json(data) + "\n")
    sys.stdout.flush()


@contextmanager
def progress(description: str, *, total: float | None = None) -> Iterator[Any]:
    """A live progress bar on a terminal (pulsing until a total is known); one plain line
    per new description elsewhere.  Yields ``advance(amount=1, description=None,
    total=None)``: ``total`` may be given (or changed) on any call."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = err_console
    if not console.is_terminal:
        console.print(f"... {description}")
        shown = [description]

        def advance_plain(
            amount: float = 1, description: str | None = None, total: float | None = None
        ) -> None:
            if description is not None and description != shown[-1]:
                shown.append(description)
                console.print(f"... {description}")

        yield advance_plain
        return
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn()]
    columns.append(TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)

        def advance(
            amount: float = 1, description: str | None = None, total: float | None = None
        ) -> None:
            bar.update(task, advance=amount, description=description, total=total)

        yield advance
