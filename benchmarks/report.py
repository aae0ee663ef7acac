"""Printing, saving and comparing benchmark results."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchmarks.common import Result


def print_results(results: Iterable[Result]) -> None:
    """One aligned table: case, value, baseline and ratio, target where one is set."""
    rows = list(results)
    if not rows:
        print("(no results)")
        return
    width = max(len(r.case) for r in rows)
    current = None
    for r in rows:
        if r.benchmark != current:
            current = r.benchmark
            print(f"\n== {current} ==")
            print(f"{'case':<{width}}  {'value':>12}  {'unit':<10} {'ratio':>8}  baseline / target")
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        base = (
            f"vs {r.baseline_case} ({r.baseline:.2f})"
            if r.baseline is not None and r.baseline_case
            else ""
        )
        target = f"  target {r.target}" if r.target else ""
        print(f"{r.case:<{width}}  {r.value:>12.2f}  {r.unit:<10} {ratio:>8}  {base}{target}")


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
