"""Shared shapes for benchmark results: one row per measured case, with its baseline."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Result:
    """One measured figure and the baseline measured beside it in the same run.

    ``ratio`` is ``value / baseline`` for costs (lower is better) and the same division
    for rates (higher is better); ``higher_is_better`` says which reading applies.
    """

    benchmark: str
    case: str
    value: float
    unit: str
    baseline_case: str | None = None
    baseline: float | None = None
    higher_is_better: bool = False
    target: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.baseline in (None, 0):
            return None
        return self.value / self.baseline  # type: ignore[operator]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = self.ratio
        return data


def repeat_best(fn: Callable[[], float], repeats: int = 3) -> tuple[float, list[float]]:
    """Run ``fn`` (which returns one measurement) ``repeats`` times; return the median
    and all samples.  Medians because these machines are noisy."""
    samples = [fn() for _ in range(repeats)]
    return statistics.median(samples), samples


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
