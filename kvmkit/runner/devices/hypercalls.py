"""Solo5-hvt-style hypercalls: one port per call (``HYPERCALL_BASE + nr``); the 32-bit value
the guest writes is the guest-physical address of the call's argument struct.

====  ======  ===========================================================
nr    name    argument struct (little endian)
====  ======  ===========================================================
1     time    ``{u64 nsecs}`` — out: host monotonic nanoseconds
2     puts    ``{u64 data_gpa; u64 len}`` — the bytes go to the console (all of
              them, streamed in chunks; the range must lie in guest RAM)
3     exit    ``{u64 code}`` — ends the run with ``code``
4     mark    ``{u64 label_gpa; u64 label_len}`` — boot-timer mark
====  ======  ===========================================================

An argument struct or buffer outside guest RAM is a guest fault: the run ends as a
crash (:class:`GuestCrashError`) that names the call, the address and the length.
"""

from __future__ import annotations

import struct
import time

from kvmkit.errors import GuestMemoryAccessError
from kvmkit.kvm import Vm
from kvmkit.runner.context import GuestExit, RunContext
from kvmkit.runner.errors import GuestCrashError

HYPERCALL_BASE = 0x500
HC_TIME, HC_PUTS, HC_EXIT, HC_MARK = 1, 2, 3, 4
HYPERCALL_COUNT = 5
#: puts copies at most this much guest memory at a time (memory stays bounded).
PUTS_CHUNK = 64 << 10
MAX_LABEL = 48
_NAMES = {HC_TIME: "time", HC_PUTS: "puts", HC_EXIT: "exit", HC_MARK: "mark"}


class Hypercalls:
    """The Solo5-style hypercall ports (table in the module docstring)."""

    name = "hypercalls"

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self._handlers = {
            HC_TIME: self._time,
            HC_PUTS: self._puts,
            HC_EXIT: self._exit,
            HC_MARK: self._mark,
        }

    def io_out(self, port: int, size: int, data: bytes) -> None:
        nr = port - HYPERCALL_BASE
        handler = self._handlers.get(nr)
        if handler is not None:
            try:
                handler(int.from_bytes(data[:size], "little"))
            except GuestMemoryAccessError as exc:
                raise GuestCrashError(f"{_NAMES[nr]} hypercall: {exc}") from None

    def io_in(self, port: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def save(self) -> dict[str, int]:
        """No state of its own (kept so a snapshot names every device)."""
        return {}

    def load(self, state: dict[str, int]) -> None:
        if state:
            raise ValueError(f"{self.name} has no state; got {sorted(state)}")

    def _time(self, arg: int) -> None:
        self.ctx.vm.write(arg, struct.pack("<Q", time.monotonic_ns()))

    def _puts(self, arg: int) -> None:
        vm = self.ctx.vm
        data_gpa, length = struct.unpack("<QQ", vm.read(arg, 16))
        if length and not _in_ram(vm, data_gpa, length):
            raise GuestCrashError(
                f"puts hypercall: {length} bytes at {data_gpa:#x} are not all in guest RAM"
            )
        for off in range(0, length, PUTS_CHUNK):
            vm_chunk = vm.read(data_gpa + off, min(PUTS_CHUNK, length - off))
            self.ctx.console.write(vm_chunk)

    def _exit(self, arg: int) -> None:
        (code,) = struct.unpack("<Q", self.ctx.vm.read(arg, 8))
        raise GuestExit(code)

    def _mark(self, arg: int) -> None:
        now = time.monotonic_ns()
        label_gpa, length = struct.unpack("<QQ", self.ctx.vm.read(arg, 16))
        label = self.ctx.vm.read(label_gpa, min(length, MAX_LABEL))
        self.ctx.add_mark(label.decode("utf-8", "replace"), now, self.ctx.vcpu_index)


def _in_ram(vm: Vm, gpa: int, length: int) -> bool:
    """``[gpa, gpa+length)`` lies in one region of guest RAM."""
    try:
        vm.region_for(gpa, length)
    except GuestMemoryAccessError:
        return False
    return True
