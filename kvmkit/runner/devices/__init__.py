"""Devices for the runner's bus, compatible with QEMU's conventions so one guest image runs
under both: debug console (isa-debugcon), exit port (isa-debug-exit), an 8250 UART subset,
fw_cfg, and Solo5-style hypercall ports."""

from kvmkit.runner.devices.debugcon import DebugConsole
from kvmkit.runner.devices.debugexit import DebugExit
from kvmkit.runner.devices.fwcfg import FwCfg
from kvmkit.runner.devices.hypercalls import Hypercalls
from kvmkit.runner.devices.uart import Uart8250

__all__ = ["DebugConsole", "DebugExit", "FwCfg", "Hypercalls", "Uart8250"]
