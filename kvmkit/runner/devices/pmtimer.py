r"""The ACPI power-management registers the FADT points at, where QEMU's PIIX4 puts them
(PM base 0x600, ``hw/acpi/piix4.c`` and ``hw/acpi/core.c``):

- 0x600 PM1a event block: PM1_STS (16 bits, write 1 to clear) and PM1_EN (16 bits);
- 0x604 PM1a control block: PM1_CNT.  SCI_EN (bit 0) reads 1: the FADT has no SMI
  command port, so the machine is always in ACPI mode.  Writing SLP_EN (bit 13) with
  SLP_TYP 0 (the DSDT's ``\\_S5``) powers the machine off, which ends the run with exit
  code 0 as QEMU's process does;
- 0x608 PM timer: a 24-bit counter at 3.579545 MHz, from the host's monotonic clock.

No SCI is ever raised (the timer-overflow and button events are not generated).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from kvmkit.runner.context import GuestExit

PM_BASE = 0x600
PM1_EVT_PORT = PM_BASE
PM1_EVT_LEN = 4
PM1_CNT_PORT = PM_BASE + 4
PM1_CNT_LEN = 2
PM_TMR_PORT = PM_BASE + 8
PM_TMR_LEN = 4
PM_TIMER_HZ = 3_579_545
PM_TIMER_MASK = 0xFF_FFFF

PM1_CNT_SCI_EN = 0x0001
PM1_CNT_SLP_EN = 0x2000
PM1_CNT_SLP_TYP_SHIFT = 10
#: SLP_TYP of the S5 (soft off) state, as the DSDT's ``\_S5`` package says.
SLP_TYP_S5 = 0


def _field(value: int, port: int, base: int, size: int) -> int:
    """The ``size`` bytes at ``port`` of a little-endian register starting at ``base``."""
    shift = 8 * (port - base)
    return (value >> shift) & ((1 << (8 * size)) - 1)


class AcpiPmTimer:
    """The 24-bit ACPI PM timer (port 0x608, 4 bytes).  ``clock`` gives monotonic ns."""

    name = "acpi-pm-timer"

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock = clock
        self._base_ns = clock()
        self._base_ticks = 0

    def ticks(self) -> int:
        """The counter as the guest reads it now."""
        elapsed = self._clock() - self._base_ns
        return (self._base_ticks + elapsed * PM_TIMER_HZ // 1_000_000_000) & PM_TIMER_MASK

    def io_out(self, port: int, size: int, data: bytes) -> None:
        pass  # read-only

    def io_in(self, port: int, size: int) -> int:
        return _field(self.ticks(), port, PM_TMR_PORT, size)

    def save(self) -> dict[str, int]:
        return {"ticks": self.ticks()}

    def load(self, state: dict[str, int]) -> None:
        self._base_ns = self._clock()
        self._base_ticks = int(state["ticks"]) & PM_TIMER_MASK


class AcpiPm1:
    """PM1a event (0x600, 4 bytes) and control (0x604, 2 bytes) blocks."""

    name = "acpi-pm1"

    def __init__(self, on_poweroff: Callable[[], None] | None = None) -> None:
        self.status = 0
        self.enable = 0
        self.control = PM1_CNT_SCI_EN
        self._on_poweroff = on_poweroff or _end_run
        self._lock = threading.Lock()

    def io_out(self, port: int, size: int, data: bytes) -> None:
        value = int.from_bytes(data[:size], "little")
        poweroff = False
        with self._lock:
            if PM1_EVT_PORT <= port < PM1_EVT_PORT + PM1_EVT_LEN:
                reg = (self.enable << 16) | self.status
                shift = 8 * (port - PM1_EVT_PORT)
                mask = ((1 << (8 * size)) - 1) << shift
                written = (value << shift) & mask
                status_clear = written & 0xFFFF
                self.status &= ~status_clear
                if mask >> 16:
                    reg = (reg & ~mask) | written
                    self.enable = (reg >> 16) & 0xFFFF
            else:
                shift = 8 * (port - PM1_CNT_PORT)
                mask = (((1 << (8 * size)) - 1) << shift) & 0xFFFF
                new = (self.control & ~mask) | ((value << shift) & mask)
                if new & PM1_CNT_SLP_EN:
                    poweroff = (new >> PM1_CNT_SLP_TYP_SHIFT) & 7 == SLP_TYP_S5
                # SLP_EN reads 0; SCI_EN stays set (no SMI command port to leave ACPI mode)
                self.control = (new & ~PM1_CNT_SLP_EN) | PM1_CNT_SCI_EN
        if poweroff:
            self._on_poweroff()

    def io_in(self, port: int, size: int) -> int:
        with self._lock:
            if PM1_EVT_PORT <= port < PM1_EVT_PORT + PM1_EVT_LEN:
                return _field((self.enable << 16) | self.status, port, PM1_EVT_PORT, size)
            return _field(self.control, port, PM1_CNT_PORT, size)

    def save(self) -> dict[str, int]:
        with self._lock:
            return {"status": self.status, "enable": self.enable, "control": self.control}

    def load(self, state: dict[str, int]) -> None:
        with self._lock:
            self.status = int(state["status"]) & 0xFFFF
            self.enable = int(state["enable"]) & 0xFFFF
            self.control = (int(state["control"]) & 0xFFFF) | PM1_CNT_SCI_EN


def _end_run() -> None:
    raise GuestExit(0)
