"""The demo's display, drawn by rich: a heading and explanation per step, tables (through
:func:`kvmkit.ui.make_table`), and one line per task that shows it running (a rich
spinner on a terminal, a plain line elsewhere) and then how it ended.  Output goes to
the stream the demo was given, so tests can read it."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TextIO

from rich.console import Console
from rich.padding import Padding

from kvmkit.ui import make_table

#: How a step says one line of its own (``Progress.say``).
Say = Callable[[str], None]
#: How a step shows one timed task (``Progress.task``), used as ``with task("label"):``.
Task = Callable[[str], AbstractContextManager[Any]]


class Progress:
    """The demo's narration on a rich console: step headings, explanations and tables."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.console = Console(
            file=out, highlight=False, width=None if out.isatty() else 120, soft_wrap=False
        )

    def step(self, number: int, title: str, explanation: str) -> None:
        self.console.print()
        self.console.print(f"Step {number}: {title}", style="bold", markup=False)
        self.console.print(Padding(explanation, (0, 0, 0, 2)), markup=False)

    def say(self, text: str) -> None:
        self.console.print(text, markup=False, soft_wrap=True)

    def table(
        self, columns: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[str] = ()
    ) -> None:
        self.console.print(Padding(make_table(columns, rows, numeric=numeric), (0, 0, 0, 2)))

    def skip(self, reason: str) -> None:
        self.say(f"  skipped: {reason}")

    def fail(self, error: str) -> None:
        self.console.print(f"  FAILED: {error}", style="bold red", markup=False)

    @contextmanager
    def task(self, label: str) -> Iterator[None]:
        """Show ``label`` while the block runs, then its duration (or FAILED)."""
        start = time.monotonic()
        ok = False
        try:
            if self.console.is_terminal:
                with self.console.status(f"  {label}", spinner="line"):
                    yield
            else:
                self.say(f"  ... {label}")
                yield
            ok = True
        finally:
            mark = "ok" if ok else "FAILED"
            self.say(f"  {mark:>6} {label} ({time.monotonic() - start:.1f} s)")
