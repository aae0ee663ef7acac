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
