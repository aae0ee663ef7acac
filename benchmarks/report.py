"""Printing (rich tables, through :mod:`kvmkit.ui`), saving and comparing benchmark
results."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks.common import Result
from kvmkit.ui import print_table

COLUMNS = ["case", "value", "unit", "baseline", "ratio", "cross-check", "target"]


def value_text(r: Result) -> str:
    """The figure, or UNRELIABLE with both values when its cross-check disagrees."""
    if r.published:
        return f"{r.value:,.2f} (PUBLISHED, not measured: {r.published})"
    if r.reliable:
        return f"{r.value:,.2f}"
    if r.check is None:
        return f"{r.value:,.2f} (NOT cross-checked)"
    return f"UNRELIABLE: {r.value:,.2f} vs {r.check:,.2f}"


def _row(r: Result) -> list[Any]:
    base = f"{r.baseline_case} ({r.baseline:,.2f})" if r.baseline_case and r.baseline else "-"
    ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
    check = (
        f"{r.check:,.2f} ({r.disagreement:.0%} apart)"
        if r.check is not None and r.disagreement is not None
        else "-"
    )
    return [r.case, value_text(r), r.unit, base, ratio, check, r.target or "-"]


def print_results(results: Iterable[Result]) -> None:
    """One rich table per benchmark: value, baseline, ratio, cross-check and target."""
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(r.benchmark, []).append(r)
    if not groups:
        print("(no results)")
    console = Console(file=sys.stdout, highlight=False, width=None if sys.stdout.isatty() else 200)
    for name, rows in groups.items():
        methods = sorted({r.check_method for r in rows if r.check_method})
        title = f"{name} (cross-check: {'; '.join(methods) or 'none'})"
        print_table(COLUMNS, [_row(r) for r in rows], title=title, console=console)


def save(results: Iterable[Result], path: Path, meta: dict[str, Any] | None = None) -> None:
    data = {"meta": meta or {}, "results": [r.to_json() for r in results]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def compare(new: Iterable[Result], old_path: Path) -> list[str]:
    """Lines comparing each case's value with the same case in an earlier JSON file."""
    old = {(r["benchmark"], r["case"]): r for r in json.loads(old_path.read_text())["results"]}
    lines = []
    for r in new:
        before = old.get((r.benchmark, r.case))
        if before is None or not before["value"]:
            lines.append(f"{r.benchmark} / {r.case}: new")
            continue
        change = r.value / before["value"]
        better = (change > 1) == r.higher_is_better
        lines.append(
            f"{r.benchmark} / {r.case}: {before['value']:.2f} -> {r.value:.2f} {r.unit} "
            f"({change:.2f}x, {'better' if better else 'worse'})"
        )
    return lines
