"""The runner as a PC: the platform devices of QEMU's ``pc`` machine on the runner's bus,
and the ACPI tables that describe them in guest memory.

:func:`install_pc_platform` puts on the bus, by port:

=============  ==========================================================
0x60, 0x64     8042 keyboard controller (probe answers; 0xfe resets)
0x70-0x71      CMOS RTC + NVRAM (IRQ 8)
0x80           POST codes (counted)
0x92           System Control Port A (A20, fast reset)
0x600-0x605    ACPI PM1a event and control blocks (S5 ends the run)
0x608-0x60b    ACPI PM timer (24-bit, 3.579545 MHz)
0xcf8-0xcff    PCI configuration mechanism #1, i440FX host bridge at 00:00.0
0xcf9          reset control register
0xc000-0xffff  PCI I/O BAR window; MMIO 0xe0000000-0xfebfffff the MMIO BAR window
=============  ==========================================================

and, when asked (``devices=("pc-testdev", "pci-testdev")``, as QEMU's ``-device``),
QEMU's test devices.  pc-testdev's byte-wise window 0xe8-0xeb overlaps the debug console
at 0xe9: the console keeps 0xe9 (QEMU does the same when ``-device pc-testdev`` comes
before ``-device isa-debugcon``).  The tables go at 0xF0000 (see :mod:`kvmkit.runner.devices.acpi`).
The MADT describes the in-kernel irqchip and PIT (``Vm.create_irqchip``,
``Vm.create_pit2``, made before); on such a VM the GSI routing is set to QEMU's (ISA
IRQ 0 on IOAPIC pin 2) to match it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from kvmkit.kvm import Vm
from kvmkit.kvm.irqroute import pc_routes
from kvmkit.runner.bus import Bus
from kvmkit.runner.devices.acpi import AcpiTables, build_acpi_tables
from kvmkit.runner.devices.i8042 import DATA_PORT, I8042, STATUS_PORT
from kvmkit.runner.devices.pci import PciBus
from kvmkit.runner.devices.pmtimer import (
    PM1_CNT_LEN,
    PM1_CNT_PORT,
    PM1_EVT_LEN,
    PM1_EVT_PORT,
    PM_TMR_LEN,
    PM_TMR_PORT,
    AcpiPm1,
    AcpiPmTimer,
)
from kvmkit.runner.devices.reset import (
    PORT92,
    POST_PORT,
    RESET_CONTROL_PORT,
    Port92,
    PostCodes,
    ResetControl,
    ResetHandler,
    end_run_on_reset,
)
from kvmkit.runner.devices.rtc import RTC_INDEX_PORT, CmosRtc
from kvmkit.runner.devices.testdev import (
    TESTDEV_FLUSH,
    TESTDEV_IOMEM,
    TESTDEV_IOMEM_LEN,
    TESTDEV_IOPORT,
    TESTDEV_IOPORT_BYTE,
    TESTDEV_IRQ_BASE,
    TESTDEV_IRQ_COUNT,
    PciTestdev,
    PcTestdev,
)
from kvmkit.runner.errors import RunnerError
from kvmkit.runner.irq import InterruptLines

#: The optional devices, by the name ``--device`` takes (QEMU's).
OPTIONAL_DEVICES: tuple[str, ...] = ("pc-testdev", "pci-testdev")


@dataclass
class PcPlatform:
    """What :func:`install_pc_platform` installed.  :meth:`close` when the run ends (it
    stops the RTC's timer thread)."""

    devices: dict[str, Any]
    pci: PciBus
    acpi: AcpiTables
    extra: tuple[str, ...] = field(default=())

    def close(self) -> None:
        self.devices["cmos-rtc"].close()

    def save(self) -> dict[str, Any]:
        """Every device's state, by device name."""
        return {name: dev.save() for name, dev in self.devices.items()}

    def load(self, state: dict[str, Any]) -> None:
        for name, dev_state in state.items():
            if name not in self.devices:
                raise RunnerError(f"platform state names device {name!r}, which this VM lacks")
            self.devices[name].load(dev_state)


def check_device_names(names: Iterable[str]) -> tuple[str, ...]:
    """``names`` if each is an optional device, else a :class:`RunnerError`."""
    out = tuple(names)
    for name in out:
        if name not in OPTIONAL_DEVICES:
            raise RunnerError(
                f"--device {name!r}: unknown device; this runner offers {', '.join(OPTIONAL_DEVICES)}"
            )
        if out.count(name) > 1:
            raise RunnerError(f"--device {name}: given twice; the machine has one")
    return out


def install_pc_platform(
    bus: Bus,
    vm: Vm,
    irq: InterruptLines,
    *,
    mem_size: int,
    vcpus: int,
    devices: Iterable[str] = (),
    on_reset: ResetHandler = end_run_on_reset,
    on_poweroff: Callable[[], None] | None = None,
    write_tables: bool = True,
) -> PcPlatform:
    """Register the pc platform's devices on ``bus`` and write the ACPI tables into
    ``vm``'s memory (which must then cover 0xF0000-0xFFFFF; ``write_tables=False`` leaves
    memory alone, for a guest whose memory comes from a snapshot or a migration, which
    holds the tables as the guest left them).  ``devices`` adds optional ones
    by name (:data:`OPTIONAL_DEVICES`).  Raises :class:`RunnerError` for an unknown device
    or tables that do not fit, :class:`~kvmkit.runner.errors.BusError` for a port or
    range already claimed."""
    extra = check_device_names(devices)
    if vm.has_irqchip:  # KVM's default sends GSI 0 to IOAPIC pin 0, against the MADT
        vm.set_gsi_routing(pc_routes())
    tables = build_acpi_tables(vcpus=vcpus, mem_size=mem_size)
    rtc = CmosRtc(irq, mem_size=mem_size, vcpus=vcpus)
    pm1, pmtimer = AcpiPm1(on_poweroff), AcpiPmTimer()
    pci = PciBus()
    installed: dict[str, Any] = {
        "cmos-rtc": rtc,
        "acpi-pm1": pm1,
        "acpi-pm-timer": pmtimer,
        "pci-host": pci,
        "i8042": I8042(on_reset),
        "post-codes": PostCodes(),
        "port92": Port92(on_reset),
        "reset-control": ResetControl(on_reset),
    }
    try:
        bus.register_ports(RTC_INDEX_PORT, 2, rtc)
        bus.register_ports(PM1_EVT_PORT, PM1_EVT_LEN, pm1)
        bus.register_ports(PM1_CNT_PORT, PM1_CNT_LEN, pm1)
        bus.register_ports(PM_TMR_PORT, PM_TMR_LEN, pmtimer)
        pci.attach(bus)
        bus.register_ports(RESET_CONTROL_PORT, 1, installed["reset-control"])
        bus.register_ports(DATA_PORT, 1, installed["i8042"])
        bus.register_ports(STATUS_PORT, 1, installed["i8042"])
        bus.register_ports(POST_PORT, 1, installed["post-codes"])
        bus.register_ports(PORT92, 1, installed["port92"])
        if "pc-testdev" in extra:
            pc_testdev = PcTestdev(irq)
            bus.register_ports(TESTDEV_IOPORT, 4, pc_testdev)
            bus.register_ports(TESTDEV_FLUSH, 4, pc_testdev)
            for port in range(TESTDEV_IOPORT_BYTE, TESTDEV_IOPORT_BYTE + 4):
                if bus.port_device(port) is None:  # 0xe9 stays the debug console's, as in QEMU
                    bus.register_ports(port, 1, pc_testdev)  # when pc-testdev comes first
            bus.register_ports(TESTDEV_IRQ_BASE, TESTDEV_IRQ_COUNT, pc_testdev)
            bus.register_mmio(TESTDEV_IOMEM, TESTDEV_IOMEM_LEN, pc_testdev)
            installed["pc-testdev"] = pc_testdev
        if "pci-testdev" in extra:
            pci_testdev = PciTestdev()
            pci.add_function(pci_testdev.function)
            installed["pci-testdev"] = pci_testdev
        if write_tables:
            vm.write(tables.base, tables.blob)
    except BaseException:
        rtc.close()
        raise
    return PcPlatform(devices=installed, pci=pci, acpi=tables, extra=extra)
