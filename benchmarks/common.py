"""Shared shapes for benchmark results: one row per measured case, with its baseline and
its cross-check."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: Relative disagreement between a figure and its cross-check above which the figure is
#: printed as UNRELIABLE with both values.
AGREEMENT = 0.10


class Skip(Exception):
    """Raised by a benchmark when this host lacks something it needs (no /dev/kvm, no
    QEMU, no compiler); the message is the reason.  Anything else a benchmark raises is
    a failure."""


@dataclass
class Result:
    """One measured figure, the baseline measured beside it in the same run, and the same
    figure measured a second, independent way (``check``, by ``check_method``).

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
    check: float | None = None
    check_method: str | None = None
    #: Set for a reference line taken from a publication, not measured: where from.
    published: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline

    @property
    def disagreement(self) -> float | None:
        if self.check is None:
            return None
        return abs(self.value - self.check) / max(abs(self.value), abs(self.check), 1e-300)

    @property
    def reliable(self) -> bool:
        """False when the cross-check is missing, not positive, or more than
        :data:`AGREEMENT` away."""
        d = self.disagreement
        return d is not None and self.check is not None and self.check > 0 and d <= AGREEMENT

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = self.ratio
        data["disagreement"] = self.disagreement
        data["reliable"] = self.reliable
        return data
