"""The PC's small system ports: POST codes (0x80), System Control Port A (0x92: fast A20
and reset) and the PIIX reset control register (0xcf9).

A write that resets the machine calls ``on_reset(reason)``: the platform passes the run's
reset request there (see :func:`end_run_on_reset` for the default), so a reset never goes
unnoticed and never hangs.  Behaviour follows QEMU: ``hw/isa/piix3.c`` (rcr: bit 2 set
resets, bit 1 is kept) and ``hw/i386/port92.c`` (bit 0 rising resets, bit 1 is A20).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from kvmkit.runner.errors import GuestCrashError

POST_PORT = 0x80
PORT92 = 0x92
RESET_CONTROL_PORT = 0xCF9

ResetHandler = Callable[[str], None]


def end_run_on_reset(reason: str) -> None:
    """The default reset handler while the runner cannot restart a guest: end the run
    with an error that says what the guest asked for."""
    raise GuestCrashError(
        f"the guest asked for a machine reset ({reason}); this runner ends the run there",
        hint="a guest that reboots to finish should exit through port 0xf4 instead",
    )


class PostCodes:
    """Port 0x80: POST codes, kept only as a count and the last value (reads all ones)."""

    name = "post-codes"

    def __init__(self) -> None:
        self.count = 0
        self.last = 0

    def io_out(self, port: int, size: int, data: bytes) -> None:
        self.count += 1
        self.last = data[0]

    def io_in(self, port: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def save(self) -> dict[str, int]:
        return {"count": self.count, "last": self.last}

    def load(self, state: dict[str, int]) -> None:
        self.count, self.last = int(state["count"]), int(state["last"]) & 0xFF


class Port92:
    """System Control Port A: bit 1 gates A20 (always on under KVM's long mode; the bit
    is kept for the guest to read), a 0 -> 1 change of bit 0 resets the machine."""

    name = "port92"

    def __init__(self, on_reset: ResetHandler) -> None:
        self._on_reset = on_reset
        self.value = 0x02  # A20 enabled, as after SeaBIOS

    def io_out(self, port: int, size: int, data: bytes) -> None:
        value = data[0]
        old, self.value = self.value, value & ~0x01
        if value & 0x01 and not old & 0x01:
            self._on_reset("port 0x92 bit 0 (fast reset)")

    def io_in(self, port: int, size: int) -> int:
        return self.value

    def save(self) -> dict[str, int]:
        return {"value": self.value}

    def load(self, state: dict[str, int]) -> None:
        self.value = int(state["value"]) & 0xFE


class ResetControl:
    """PIIX reset control register at 0xcf9 (byte accesses only; dword accesses at 0xcf8
    belong to PCI configuration)."""

    name = "reset-control"

    def __init__(self, on_reset: ResetHandler) -> None:
        self._on_reset = on_reset
        self.value = 0
        self._lock = threading.Lock()

    def io_out(self, port: int, size: int, data: bytes) -> None:
        value = data[0]
        with self._lock:
            self.value = value & 0x02  # only "full reset" is kept
        if value & 0x04:
            self._on_reset(f"write {value:#04x} to the reset control register 0xcf9")

    def io_in(self, port: int, size: int) -> int:
        return self.value

    def save(self) -> dict[str, int]:
        return {"value": self.value}

    def load(self, state: dict[str, int]) -> None:
        self.value = int(state["value"]) & 0x02
