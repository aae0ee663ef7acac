"""The anatomy of a VM exit: ``io-storm`` and ``mmio-storm`` under the runner, with each
exit's cost split into the time spent inside ``KVM_RUN`` (guest code, the CPU's world
switch and KVM's own handling in the kernel) and the time spent in the VMM (kvmkit, between
two ``KVM_RUN`` calls), for the C fast path and the Python loop."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kvmkit.guests import build_guest
from kvmkit.runner.machine import RunConfig, run_guest


@dataclass
class ExitCost:
    case: str
    loop: str
    exits: int
    in_kvm_run_us: float  # per exit
    in_vmm_us: float  # per exit

    @property
    def total_us(self) -> float:
        return self.in_kvm_run_us + self.in_vmm_us

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_us"] = self.total_us
        return d


CASES = [
    ("port I/O from CPL 3", "io-storm", "cpl=3"),
    ("port I/O from CPL 0", "io-storm", "cpl=0"),
    ("MMIO write from CPL 3", "mmio-storm", "cpl=3"),
]


def measure_exit_costs(n: int = 20000) -> list[ExitCost]:
    """Run each storm with ``n`` exits under both loops; per-exit figures come from the
    runner's own statistics (every ``KVM_RUN`` is timed)."""
    out = []
    for case, guest, args in CASES:
        image = build_guest(guest)
        for python_loop in (False, True):
            r = run_guest(
                RunConfig(
                    image=image,
                    append=f"n={n} {args}",
                    python_loop=python_loop,
                    echo=None,
                    timeout=300,
                )
            )
            if r.reason != "exit" or r.exit_code != 0:
                raise RuntimeError(
                    f"{guest} {args} ended with {r.reason} {r.exit_code}: {r.console[-200:]}"
                )
            exits = r.stats.total_exits
            out.append(
                ExitCost(
                    case,
                    "Python loop" if python_loop else "C fast path",
                    exits,
                    r.stats.time_in_guest_s / exits * 1e6,
                    r.stats.time_in_vmm_s / exits * 1e6,
                )
            )
    return out


def format_exit_costs(costs: list[ExitCost]) -> str:
    lines = [
        f"  {'exit':<24} {'loop':<12} {'exits':>7} {'in KVM_RUN':>11} {'in VMM':>9} {'total':>9}"
    ]
    for c in costs:
        lines.append(
            f"  {c.case:<24} {c.loop:<12} {c.exits:>7} {c.in_kvm_run_us:>9.2f}µs {c.in_vmm_us:>7.2f}µs {c.total_us:>7.2f}µs"
        )
    return "\n".join(lines)
