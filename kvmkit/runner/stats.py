"""Exit statistics, kept per vCPU by either run loop and merged for the report.

The vocabulary of exit kinds is shared with the C fast path (``KVMKIT_KIND_*`` in
``csrc/fastpath.c``) so both loops produce identical statistics.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

K = TypeVar("K", bound=Hashable)

#: Distinct keys a per-address counter keeps; accesses to further addresses are counted
#: under its ``other`` key, so a guest cannot grow kvmkit's memory by touching new ones.
#: (Ports need no cap: there are 65,536 of them, and a plain Counter keeps the hottest
#: path — one increment per port exit — at C speed.)
MAX_KEYS = 1024
OTHER_MMIO = -1
OTHER_UNCLAIMED = ("other", -1)


class BoundedCounter(Counter[K]):
    """A :class:`~collections.Counter` of at most ``cap`` distinct keys plus ``other``:
    a new key beyond the cap is counted under ``other`` instead."""

    def __init__(self, other: K, cap: int = MAX_KEYS) -> None:
        super().__init__()
        self.other = other
        self.cap = cap

    def __setitem__(self, key: K, value: int) -> None:
        if key not in self and len(self) >= self.cap and key != self.other:
            # a missing key counted from 0, so ``value`` is the increment
            super().__setitem__(self.other, self.get(self.other, 0) + value)
            return
        super().__setitem__(key, value)

    def __reduce__(self) -> Any:  # pickling/copying keeps the cap
        return (type(self), (self.other, self.cap), None, None, iter(self.items()))


def _mmio() -> BoundedCounter[int]:
    return BoundedCounter(OTHER_MMIO)


def _unclaimed() -> BoundedCounter[tuple[str, int]]:
    return BoundedCounter(OTHER_UNCLAIMED)


def _addr(a: int) -> str:
    return "other" if a < 0 else f"{a:#x}"


#: Exit kinds, indexed by the C fast path's ``KVMKIT_KIND_*`` numbers.
KINDS = (
    "io_out",
    "io_in",
    "mmio_read",
    "mmio_write",
    "hlt",
    "shutdown",
    "debug",
    "fail_entry",
    "internal_error",
    "system_event",
    "interrupted",
    "irq_window_open",
    "unknown",
)


@dataclass(frozen=True)
class Mark:
    """A boot-timer mark: the guest's label and seconds since the run started."""

    label: str
    t_s: float
    vcpu: int


@dataclass
class VcpuStats:
    """What one vCPU's loop counted.  Only that vCPU's thread writes it."""

    exits: Counter[str] = field(default_factory=Counter)
    ports: Counter[int] = field(default_factory=Counter)
    mmio: Counter[int] = field(default_factory=_mmio)
    #: (``"port"`` or ``"mmio"``, address) -> accesses nothing claimed
    unclaimed: Counter[tuple[str, int]] = field(default_factory=_unclaimed)
    kvm_run_calls: int = 0
    ns_in_run: int = 0
    ns_total: int = 0


@dataclass
class RunStats:
    """Statistics of a whole run, all vCPUs merged."""

    exits: Counter[str] = field(default_factory=Counter)
    ports: Counter[int] = field(default_factory=Counter)
    mmio: Counter[int] = field(default_factory=_mmio)
    unclaimed: Counter[tuple[str, int]] = field(default_factory=_unclaimed)
    kvm_run_calls: int = 0
    time_in_guest_s: float = 0.0
    time_in_vmm_s: float = 0.0
    wall_s: float = 0.0
    marks: list[Mark] = field(default_factory=list)
    marks_dropped: int = 0

    @classmethod
    def merge(
        cls, per_vcpu: list[VcpuStats], marks: list[Mark], wall_s: float, marks_dropped: int = 0
    ) -> RunStats:
        out = cls(
            marks=sorted(marks, key=lambda m: m.t_s), wall_s=wall_s, marks_dropped=marks_dropped
        )
        for s in per_vcpu:
            out.exits.update(s.exits)
            out.ports.update(s.ports)
            out.mmio.update(s.mmio)
            out.unclaimed.update(s.unclaimed)
            out.kvm_run_calls += s.kvm_run_calls
            out.time_in_guest_s += s.ns_in_run / 1e9
            out.time_in_vmm_s += max(s.ns_total - s.ns_in_run, 0) / 1e9
        return out

    @property
    def total_exits(self) -> int:
        return sum(self.exits.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "exits": dict(sorted(self.exits.items())),
            "exits_by_port": {_addr(p): n for p, n in sorted(self.ports.items())},
            "exits_by_mmio_address": {_addr(a): n for a, n in sorted(self.mmio.items())},
            "unclaimed": {
                f"{kind}:{_addr(addr)}": n for (kind, addr), n in sorted(self.unclaimed.items())
            },
            "kvm_run_calls": self.kvm_run_calls,
            "time_in_guest_s": round(self.time_in_guest_s, 6),
            "time_in_vmm_s": round(self.time_in_vmm_s, 6),
            "wall_s": round(self.wall_s, 6),
            "marks": [
                {"label": m.label, "t_s": round(m.t_s, 6), "vcpu": m.vcpu} for m in self.marks
            ],
            "marks_dropped": self.marks_dropped,
        }

    def format_table(self) -> str:
        """A human-readable report for stderr."""
        lines = ["exits by reason:"]
        for name, n in sorted(self.exits.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {name:<16} {n:>10}")
        lines.append(f"  {'total':<16} {self.total_exits:>10}")
        if self.ports:
            lines.append("exits by port:")
            for port, n in self.ports.most_common(10):
                lines.append(f"  {_addr(port):<6}           {n:>10}")
        if self.mmio:
            lines.append("exits by MMIO address:")
            for addr, n in self.mmio.most_common(10):
                lines.append(f"  {_addr(addr):<12}     {n:>10}")
        if self.unclaimed:
            lines.append(
                "unclaimed accesses: "
                + ", ".join(f"{k} {_addr(a)} x{n}" for (k, a), n in self.unclaimed.items())
            )
        per_exit = (
            (self.time_in_guest_s + self.time_in_vmm_s) / self.total_exits * 1e6
            if self.total_exits
            else 0.0
        )
        lines += [
            f"KVM_RUN calls     {self.kvm_run_calls:>10}",
            f"time in KVM_RUN   {self.time_in_guest_s:>10.6f} s   (guest + kernel)",
            f"time in VMM       {self.time_in_vmm_s:>10.6f} s   (kvmkit, between KVM_RUN calls)",
            f"per exit          {per_exit:>10.2f} µs   (all time / exits)",
        ]
        if self.marks:
            lines.append("boot-timer marks:")
            for m in self.marks:
                lines.append(f"  {m.t_s * 1e3:>10.3f} ms  {m.label}  (vcpu {m.vcpu})")
        return "\n".join(lines)
