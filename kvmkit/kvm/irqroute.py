"""GSI routes for ``Vm.set_gsi_routing`` (``KVM_SET_GSI_ROUTING``).

``KVM_SET_GSI_ROUTING`` replaces the whole table, so a caller that adds an MSI route
starts from :func:`default_routes` (what KVM installs with ``KVM_CREATE_IRQCHIP`` on
x86, ``default_routing`` in arch/x86/kvm/irq_comm.c: GSIs 0-15 to a PIC pin (0-7 the
master, 8-15 the slave) and to the IOAPIC pin of the same number, 16-23 to the IOAPIC).
"""

from __future__ import annotations

from dataclasses import dataclass

#: ``KVM_IRQCHIP_*`` numbers (<linux/kvm.h>).
PIC_MASTER, PIC_SLAVE, IOAPIC = 0, 1, 2
IOAPIC_PINS = 24


@dataclass(frozen=True)
class IrqchipRoute:
    """GSI ``gsi`` drives ``pin`` of the in-kernel chip ``irqchip`` (PIC_MASTER,
    PIC_SLAVE or IOAPIC)."""

    gsi: int
    irqchip: int
    pin: int


@dataclass(frozen=True)
class MsiRoute:
    """GSI ``gsi`` sends the MSI ``address``/``data`` (e.g. ``0xfee00000`` and a vector)."""

    gsi: int
    address: int
    data: int


Route = IrqchipRoute | MsiRoute


def default_routes() -> list[Route]:
    """KVM's own x86 default table (``kvm_setup_default_irq_routing``)."""
    routes: list[Route] = []
    for gsi in range(16):
        routes.append(IrqchipRoute(gsi, PIC_MASTER if gsi < 8 else PIC_SLAVE, gsi % 8))
    for gsi in range(IOAPIC_PINS):
        routes.append(IrqchipRoute(gsi, IOAPIC, gsi))
    return routes


def pc_routes() -> list[Route]:
    """QEMU's ``pc`` table (``kvm_pc_setup_irq_routing``): GSIs 0-15 except 2 on the
    PICs, GSI 0 on IOAPIC pin 2 (the MADT's IRQ 0 -> GSI 2 override, so the PIT's
    interrupt reaches pin 2), GSIs 1 and 3-23 on the IOAPIC pin of their number."""
    routes: list[Route] = [
        IrqchipRoute(gsi, PIC_MASTER if gsi < 8 else PIC_SLAVE, gsi % 8)
        for gsi in range(16)
        if gsi != 2
    ]
    routes.append(IrqchipRoute(0, IOAPIC, 2))
    routes += [IrqchipRoute(gsi, IOAPIC, gsi) for gsi in range(1, IOAPIC_PINS) if gsi != 2]
    return routes
