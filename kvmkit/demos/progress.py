"""A small progress display for the demo: a heading and explanation per step, then one
line per task that shows it running (a spinner on a terminal) and how long it took."""

from __future__ import annotations

import itertools
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class Progress:
    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.tty = out.isatty()

    def step(self, number: int, title: str, explanation: str) -> None:
        self.out.write(
            f"\n\033[1mStep {number}: {title}\033[0m\n"
            if self.tty
            else f"\nStep {number}: {title}\n"
        )
        for line in textwrap.wrap(explanation, 88):
            self.out.write(f"  {line}\n")
        self.out.flush()

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def skip(self, reason: str) -> None:
        self.say(f"  skipped: {reason}")

    @contextmanager
    def task(self, label: str) -> Iterator[None]:
        """Show ``label`` while the block runs, then its duration (or its failure)."""
        start = time.monotonic()
        stop = threading.Event()
        spinner: threading.Thread | None = None
        if self.tty:

            def spin() -> None:
                for ch in itertools.cycle("|/-\\"):
                    if stop.wait(0.15):
                        return
                    self.out.write(f"\r  {ch} {label} ({time.monotonic() - start:.0f} s)")
                    self.out.flush()

            spinner = threading.Thread(target=spin, daemon=True)
            spinner.start()
        else:
            self.say(f"  ... {label}")
        ok = False
        try:
            yield
            ok = True
        finally:
            stop.set()
            if spinner is not None:
                spinner.join()
                self.out.write("\r\033[K")
            mark = "ok" if ok else "FAILED"
            self.say(f"  {mark:>3} {label} ({time.monotonic() - start:.1f} s)")
