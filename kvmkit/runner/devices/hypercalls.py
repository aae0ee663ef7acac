"""Solo5-hvt-style hypercalls: one port per call (``HYPERCALL_BASE + nr``); the 32-bit value
the guest writes is the guest-physical address of the call's argument struct.

====  ======  ===========================================================
nr    name    argument struct (little endian)
====  ======  ===========================================================
1     time    ``{u64 nsecs}`` — out: host monotonic nanoseconds
2     puts    ``{u64 data_gpa; u64 len}`` — the bytes go to the console
3     exit    ``{u64 code}`` — ends the run with ``code``
4     mark    ``{u64 label_gpa; u64 label_len}`` — boot-timer mark
====  ======  ===========================================================
"""

from __future__ import annotations

import struct
import time

from kvmkit.runner.context import GuestExit, RunContext

HYPERCALL_BASE = 0x500
HC_TIME, HC_PUTS, HC_EXIT, HC_MARK = 1, 2, 3, 4
HYPERCALL_COUNT = 5
MAX_PUTS = 1 << 20
MAX_LABEL = 48


class Hypercalls:
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
        handler = self._handlers.get(port - HYPERCALL_BASE)
        if handler is not None:
            handler(int.from_bytes(data[:size], "little"))

    def io_in(self, port: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def _time(self, arg: int) -> None:
        self.ctx.vm.write(arg, struct.pack("<Q", time.monotonic_ns()))

    def _puts(self, arg: int) -> None:
        data_gpa, length = struct.unpack("<QQ", self.ctx.vm.read(arg, 16))
        self.ctx.console.write(self.ctx.vm.read(data_gpa, min(length, MAX_PUTS)))

    def _exit(self, arg: int) -> None:
        (code,) = struct.unpack("<Q", self.ctx.vm.read(arg, 8))
        raise GuestExit(code)

    def _mark(self, arg: int) -> None:
        now = time.monotonic_ns()
        label_gpa, length = struct.unpack("<QQ", self.ctx.vm.read(arg, 16))
        label = self.ctx.vm.read(label_gpa, min(length, MAX_LABEL))
        self.ctx.add_mark(label.decode("utf-8", "replace"), now, self.ctx.vcpu_index)
