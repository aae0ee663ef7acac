"""What the C fast path answers itself beyond the console, exit and mark ports: writes to
MMIO no bus device claims (dropped and counted, as the Python loop does) and HLT when the
loop resumes after it — always agreeing with the Python loop, and never for an address a
device claims or when --strict must trip."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from kvmkit.demos import exits
from kvmkit.runner.context import RunContext
from kvmkit.runner.loop import Outcome, VcpuLoop
from kvmkit.runner.machine import build_bus

MMIO = "MMIO write, CPL 0"
HLT = "HLT, CPL 0"
N = 300


class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def mmio_write(self, addr: int, data: bytes) -> None:
        self.writes.append((addr, data))

    def mmio_read(self, addr: int, length: int) -> int:
        return 0


def _run(
    case: str, *, python: bool, device: Any = None, strict: bool = False, resume: bool = True
) -> tuple[Outcome, VcpuLoop]:
    with exits.prepared_vcpu(case, N) as (vm, cpu):
        ctx = RunContext(vm, echo=None)
        bus = build_bus(ctx, mem_size=exits.MEM_SIZE, vcpus=1)
        if device is not None:
            bus.register_mmio(exits.MMIO_ADDR, 4, device)
        loop = VcpuLoop(cpu, bus, ctx, threading.Event(), strict=strict, halt_ends_run=not resume)
        outcome = loop.run_python() if python else loop.run_fast()
        return outcome, loop


def test_unclaimed_mmio_writes_stay_in_c_and_count_as_in_python(require_kvm: None) -> None:
    fast_outcome, fast = _run(MMIO, python=False)
    assert fast_outcome.kind == "exit"
    assert fast._fp.nsink == 1 and fast._fp.sink[0].addr == exits.MMIO_ADDR
    assert fast._fp.sink[0].n == N  # every write counted in C, none went to Python
    slow_outcome, slow = _run(MMIO, python=True)
    assert slow_outcome.kind == "exit"
    f, s = fast.stats, slow.stats
    assert (f.exits, f.mmio, f.unclaimed) == (s.exits, s.mmio, s.unclaimed)
    assert f.unclaimed["mmio", exits.MMIO_ADDR] == N
    assert f.kvm_run_calls == s.kvm_run_calls
    assert fast._fp.nsink == 0  # merged once, never twice
    assert fast.stats.unclaimed["mmio", exits.MMIO_ADDR] == N


def test_a_claimed_mmio_address_goes_to_its_device(require_kvm: None) -> None:
    device = Recorder()
    outcome, loop = _run(MMIO, python=False, device=device)
    assert outcome.kind == "exit"
    assert loop._fp.nsink == 0
    assert len(device.writes) == N and device.writes[0][0] == exits.MMIO_ADDR
    assert not loop.stats.unclaimed


def test_strict_still_trips_on_unclaimed_mmio(require_kvm: None) -> None:
    outcome, _ = _run(MMIO, python=False, strict=True)
    assert outcome.kind == "error" and "unclaimed mmio 0xd0000000" in str(outcome.error)


@pytest.mark.parametrize("python", [False, True])
def test_hlt_resumes_in_both_loops_and_counts_alike(require_kvm: None, python: bool) -> None:
    outcome, loop = _run(HLT, python=python)
    assert outcome.kind == "exit"
    assert loop.stats.exits["hlt"] == N


def test_hlt_still_ends_the_run_when_it_should(require_kvm: None) -> None:
    outcome, loop = _run(HLT, python=False, resume=False)
    assert outcome.kind == "halt"
    assert loop.stats.exits["hlt"] == 1
