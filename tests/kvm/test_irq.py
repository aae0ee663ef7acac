"""Interrupt plumbing on the real /dev/kvm: ioeventfd (a guest write signals an eventfd
with no exit), irqfd, MSI and GSI routing, and KVM_IRQ_LINE through the IOAPIC, each
proven by a tiny long-mode guest that takes the interrupt."""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Iterator

import pytest

from kvmkit.errors import KvmError
from kvmkit.kvm import Interrupted, IoOut, Vcpu, Vm
from kvmkit.kvm.irqroute import MsiRoute, default_routes
from kvmkit.kvm.modes import DEFAULT_TABLES_AT, setup_long_mode
from kvmkit.runner.errors import RunnerError
from kvmkit.runner.irq import IrqChipLines

CODE_AT = 0x100000
STACK = 0x80000
IDT_AT = DEFAULT_TABLES_AT + 0xA000  # where setup_long_mode puts the IDT

# _start: mask both PICs (KVM resets the BSP's LINT0 to ExtINT, so an unprogrammed PIC
#         would deliver vector 0+irq); LAPIC SVR = 0x1ff; IOAPIC pin 5 -> vector 0x41 (edge, fixed, CPU 0);
#         out 0x601 ("ready"); sti; 1: hlt; jmp 1b
_MAIN = bytes.fromhex(
    "b0ffe621e6a1"  # mov $0xff,%al; out %al,$0x21; out %al,$0xa1
    "48b8f000e0fe00000000c700ff010000"  # movabs $0xfee000f0,%rax; movl $0x1ff,(%rax)
    "48b80000c0fe00000000"  # movabs $0xfec00000,%rax
    "c7001a000000c7401041000000"  # IOREGSEL=0x1a; IOWIN=0x41
    "c7001b000000c7401000000000"  # IOREGSEL=0x1b; IOWIN=0
    "66ba0106ee"  # mov $0x601,%dx; out %al,(%dx)
    "fbf4ebfd"  # sti; 1: hlt; jmp 1b
)
H40_AT, H41_AT = CODE_AT + 0x100, CODE_AT + 0x180
_H40 = bytes.fromhex("66ba0206ee") + bytes([0xEB, 0x7E])  # out 0x602; jmp eoi
_H41 = bytes.fromhex(
    "66ba0306ee"  # out 0x603
    "48b8b000e0fe00000000c70000000000"  # eoi: movabs $0xfee000b0,%rax; movl $0,(%rax)
    "48cf"  # iretq
)


def _gate(handler: int) -> bytes:
    """A 64-bit interrupt gate to ``handler`` in the runner's CPL-0 code segment."""
    return (
        (handler & 0xFFFF).to_bytes(2, "little")
        + (0x08).to_bytes(2, "little")
        + bytes([0, 0x8E])
        + ((handler >> 16) & 0xFFFF).to_bytes(2, "little")
        + (handler >> 32).to_bytes(4, "little")
        + bytes(4)
    )


@pytest.fixture
def irq_guest(vm: Vm) -> Iterator[tuple[Vm, Vcpu]]:
    """A VM with the irqchip whose guest has said "ready" and now waits in HLT with
    interrupts on: vector 0x40 answers on port 0x602, vector 0x41 on port 0x603."""
    vm.create_irqchip()
    vm.add_memory(0, 4 << 20)
    vm.write(CODE_AT, _MAIN)
    vm.write(H40_AT, _H40)
    vm.write(H41_AT, _H41)
    cpu = vm.create_vcpu(0)
    setup_long_mode(cpu, entry=CODE_AT, stack=STACK)
    vm.write(IDT_AT + 0x40 * 16, _gate(H40_AT) + _gate(H41_AT))
    ready = cpu.run()
    assert isinstance(ready, IoOut) and ready.port == 0x601, ready
    yield vm, cpu


def _run_with_watchdog(cpu: Vcpu, trigger: threading.Timer) -> object:
    """``cpu.run()`` while ``trigger`` fires from another thread; a 30 s watchdog kicks
    the vCPU so a missing interrupt fails the test instead of hanging it."""
    watchdog = threading.Timer(30.0, cpu.kick)
    trigger.start()
    watchdog.start()
    try:
        return cpu.run()
    finally:
        trigger.cancel()
        watchdog.cancel()
        trigger.join()
        watchdog.join()


def test_ioeventfd_write_signals_the_eventfd_without_an_exit(vm: Vm) -> None:
    vm.add_memory(0, 4 << 20)
    # out 0x600 <- 1 (matches: no exit); out 0x601; out 0x600 <- 2 (no match: exit); hlt
    vm.write(
        CODE_AT,
        bytes.fromhex("66ba0006b001ee66ba0106ee66ba0006b002eef4"),
    )
    cpu = vm.create_vcpu(0)
    setup_long_mode(cpu, entry=CODE_AT, stack=STACK)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        vm.ioeventfd(efd, 0x600, 1, datamatch=1)
        first = cpu.run()
        assert isinstance(first, IoOut) and first.port == 0x601  # 0x600 never came to us
        assert select.select([efd], [], [], 0)[0] == [efd]
        assert os.eventfd_read(efd) == 1
        second = cpu.run()
        assert isinstance(second, IoOut) and (second.port, second.value) == (0x600, 2)
        vm.ioeventfd(efd, 0x600, 1, datamatch=1, deassign=True)
        with pytest.raises(KvmError):  # already gone: the kernel says so
            vm.ioeventfd(efd, 0x600, 1, datamatch=1, deassign=True)
    finally:
        os.close(efd)


def test_ioeventfd_rejects_a_bad_length(vm: Vm) -> None:
    with pytest.raises(KvmError, match="length 3"):
        vm.ioeventfd(0, 0x600, 3)


def test_irqfd_on_an_msi_route_interrupts_a_halted_guest(irq_guest: tuple[Vm, Vcpu]) -> None:
    vm, cpu = irq_guest
    vm.set_gsi_routing([*default_routes(), MsiRoute(gsi=24, address=0xFEE00000, data=0x40)])
    efd = os.eventfd(0)
    try:
        vm.irqfd(efd, 24)
        got = _run_with_watchdog(cpu, threading.Timer(0.2, os.eventfd_write, (efd, 1)))
        assert isinstance(got, IoOut) and got.port == 0x602, got
        vm.irqfd(efd, 24, deassign=True)
    finally:
        os.close(efd)


def test_signal_msi_is_delivered(irq_guest: tuple[Vm, Vcpu]) -> None:
    vm, cpu = irq_guest
    got = _run_with_watchdog(cpu, threading.Timer(0.2, lambda: vm.signal_msi(0xFEE00000, 0x41)))
    assert isinstance(got, IoOut) and got.port == 0x603, got


def test_irq_line_through_the_ioapic(irq_guest: tuple[Vm, Vcpu]) -> None:
    vm, cpu = irq_guest
    lines = IrqChipLines(vm)
    got = _run_with_watchdog(cpu, threading.Timer(0.2, lines.pulse, (5,)))
    assert isinstance(got, IoOut) and got.port == 0x603, got
    with pytest.raises(RunnerError, match="out of range"):
        lines.set_level(24, True)


def test_a_kick_still_interrupts_a_halted_guest(irq_guest: tuple[Vm, Vcpu]) -> None:
    _, cpu = irq_guest
    assert _run_with_watchdog(cpu, threading.Timer(0.2, cpu.kick)) == Interrupted()
