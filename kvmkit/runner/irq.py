"""How devices raise interrupts: one small interface on the VM's interrupt controllers.

A device is handed an :class:`InterruptLines` and calls ``set_level(gsi, level)`` for a
level-triggered line (the UART's IRQ 4 follows its IIR) or ``pulse(gsi)`` for an edge.
On a VM with the in-kernel irqchip (PIC + IOAPIC + LAPICs) the call becomes
``KVM_IRQ_LINE``; GSIs 0-15 reach both the PIC and the IOAPIC, 16-23 the IOAPIC only,
as KVM's default routing (and QEMU's ``pc`` machine) wires them.  On a machine created
with ``--no-irqchip`` there is nothing to deliver to, and :class:`NoInterrupts` drops
the call (a device can still be polled).
"""

from __future__ import annotations

from typing import Protocol

from kvmkit.runner.errors import RunnerError

#: GSIs of KVM's default routing on x86: 24 IOAPIC pins (0-15 also on the PICs).
IOAPIC_PINS = 24


class InterruptLines(Protocol):
    """What a device may call to raise its interrupt."""

    def set_level(self, gsi: int, level: bool) -> None: ...

    def pulse(self, gsi: int) -> None: ...


def check_gsi(gsi: int, limit: int = IOAPIC_PINS) -> int:
    """``gsi`` if it is a line this machine has, else a :class:`RunnerError`."""
    if not isinstance(gsi, int) or not 0 <= gsi < limit:
        raise RunnerError(
            f"IRQ line {gsi!r} is out of range: this machine has GSIs 0 to {limit - 1}"
        )
    return gsi


class NoInterrupts:
    """The bare machine (``--no-irqchip``): interrupts have nowhere to go."""

    def set_level(self, gsi: int, level: bool) -> None:
        check_gsi(gsi)

    def pulse(self, gsi: int) -> None:
        check_gsi(gsi)
