"""Devices for the runner's bus, compatible with QEMU's conventions so one guest image runs
under both: debug console (isa-debugcon), exit port (isa-debug-exit), an 8250 UART subset,
fw_cfg, Solo5-style hypercall ports, and the pc platform (:mod:`kvmkit.runner.platform`
installs it): CMOS RTC, ACPI tables and PM registers, PCI host, reset paths, 8042, and
QEMU's test devices."""

from kvmkit.runner.devices.acpi import AcpiTables, build_acpi_tables
from kvmkit.runner.devices.debugcon import DebugConsole
from kvmkit.runner.devices.debugexit import DebugExit
from kvmkit.runner.devices.fwcfg import FwCfg
from kvmkit.runner.devices.hypercalls import Hypercalls
from kvmkit.runner.devices.i8042 import I8042
from kvmkit.runner.devices.pci import PciBar, PciBus, PciFunction
from kvmkit.runner.devices.pmtimer import AcpiPm1, AcpiPmTimer
from kvmkit.runner.devices.reset import Port92, PostCodes, ResetControl
from kvmkit.runner.devices.rtc import CmosRtc
from kvmkit.runner.devices.testdev import PciTestdev, PcTestdev
from kvmkit.runner.devices.uart import Uart8250

__all__ = [
    "DebugConsole",
    "DebugExit",
    "FwCfg",
    "Hypercalls",
    "Uart8250",
    "CmosRtc",
    "AcpiTables",
    "build_acpi_tables",
    "AcpiPm1",
    "AcpiPmTimer",
    "PciBus",
    "PciFunction",
    "PciBar",
    "I8042",
    "Port92",
    "PostCodes",
    "ResetControl",
    "PcTestdev",
    "PciTestdev",
]
