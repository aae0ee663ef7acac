"""Just enough of the 8042 keyboard controller (0x60 data, 0x64 status/command) that a
kernel probing it gets answers instead of spinning, and that command 0xfe (pulse the
reset line) resets the machine — the oldest way a PC reboots.

There is no keyboard or mouse behind it: the controller's self-tests pass, the
configuration byte and output port are kept, keyboard commands written to 0x60 are
acknowledged (0xfa; reset also answers 0xaa, identify answers 0xab 0x83), and nothing
ever arrives on its own, so no interrupt is raised.  Output waiting for the guest is
bounded (:data:`QUEUE_LIMIT` bytes).  Commands follow QEMU's ``hw/input/pckbd.c``.
"""

from __future__ import annotations

import threading
from collections import deque

from kvmkit.runner.bus import DeviceState
from kvmkit.runner.devices.reset import ResetHandler

DATA_PORT = 0x60
STATUS_PORT = 0x64
QUEUE_LIMIT = 16

STAT_OBF = 0x01
STAT_SYS = 0x04
STAT_CMD = 0x08
STAT_UNLOCKED = 0x10

CMD_READ_MODE, CMD_WRITE_MODE = 0x20, 0x60
CMD_DISABLE_AUX, CMD_ENABLE_AUX, CMD_TEST_AUX = 0xA7, 0xA8, 0xA9
CMD_SELF_TEST, CMD_KBD_TEST = 0xAA, 0xAB
CMD_DISABLE_KBD, CMD_ENABLE_KBD = 0xAD, 0xAE
CMD_READ_OUTPORT, CMD_WRITE_OUTPORT = 0xD0, 0xD1
CMD_WRITE_OBUF, CMD_WRITE_AUX_OBUF, CMD_WRITE_AUX = 0xD2, 0xD3, 0xD4
CMD_RESET = 0xFE

KBD_ACK = 0xFA
MODE_DEFAULT = 0x61  # translate, IRQ 1 enabled, system flag (after BIOS POST)


class I8042:
    """The 8042 controller on ports 0x60/0x64; command 0xfe calls ``on_reset``."""

    name = "i8042"

    def __init__(self, on_reset: ResetHandler) -> None:
        self._on_reset = on_reset
        self._lock = threading.Lock()
        self.mode = MODE_DEFAULT
        self.outport = 0x03  # reset line high (inactive), A20 enabled
        self.pending = 0  # command waiting for its data byte on port 0x60
        self.last_was_command = False
        self.queue: deque[int] = deque(maxlen=QUEUE_LIMIT)

    def _status(self) -> int:
        status = STAT_SYS | STAT_UNLOCKED
        if self.queue:
            status |= STAT_OBF
        if self.last_was_command:
            status |= STAT_CMD
        return status

    def io_in(self, port: int, size: int) -> int:
        with self._lock:
            if port == STATUS_PORT:
                return self._status()
            return self.queue.popleft() if self.queue else 0x00

    def io_out(self, port: int, size: int, data: bytes) -> None:
        value = data[0]
        reset: str | None = None
        with self._lock:
            if port == STATUS_PORT:
                self.last_was_command = True
                reset = self._command(value)
            else:
                self.last_was_command = False
                reset = self._data(value)
        if reset:
            self._on_reset(reset)

    def _command(self, cmd: int) -> str | None:
        self.pending = 0
        if cmd == CMD_READ_MODE:
            self.queue.append(self.mode)
        elif cmd in (
            CMD_WRITE_MODE,
            CMD_WRITE_OUTPORT,
            CMD_WRITE_OBUF,
            CMD_WRITE_AUX_OBUF,
            CMD_WRITE_AUX,
        ):
            self.pending = cmd
        elif cmd == CMD_SELF_TEST:
            self.queue.append(0x55)
        elif cmd in (CMD_KBD_TEST, CMD_TEST_AUX):
            self.queue.append(0x00)
        elif cmd == CMD_DISABLE_KBD:
            self.mode |= 0x10
        elif cmd == CMD_ENABLE_KBD:
            self.mode &= ~0x10
        elif cmd == CMD_DISABLE_AUX:
            self.mode |= 0x20
        elif cmd == CMD_ENABLE_AUX:
            self.mode &= ~0x20
        elif cmd == CMD_READ_OUTPORT:
            self.queue.append(self.outport)
        elif cmd & 0xF0 == 0xF0 and not cmd & 0x01:
            return f"keyboard controller command {cmd:#04x} (pulse the reset line)"
        return None

    def _data(self, value: int) -> str | None:
        cmd, self.pending = self.pending, 0
        if cmd == CMD_WRITE_MODE:
            self.mode = value
        elif cmd == CMD_WRITE_OUTPORT:
            self.outport = value
            if not value & 0x01:
                return "keyboard controller output port write with the reset bit clear"
        elif cmd in (CMD_WRITE_OBUF, CMD_WRITE_AUX_OBUF):
            self.queue.append(value)
        elif cmd == CMD_WRITE_AUX:
            pass  # no mouse: the byte goes nowhere
        else:  # a command for the keyboard itself
            self.queue.append(KBD_ACK)
            if value == 0xFF:
                self.queue.append(0xAA)  # reset: self-test passed
            elif value == 0xF2:
                self.queue.extend((0xAB, 0x83))  # identify: MF2 keyboard
        return None

    def save(self) -> dict[str, object]:
        with self._lock:
            return {
                "mode": self.mode,
                "outport": self.outport,
                "pending": self.pending,
                "last_was_command": self.last_was_command,
                "queue": list(self.queue),
            }

    def load(self, state: DeviceState) -> None:
        with self._lock:
            self.mode = int(state["mode"]) & 0xFF
            self.outport = int(state["outport"]) & 0xFF
            self.pending = int(state["pending"]) & 0xFF
            self.last_was_command = bool(state["last_was_command"])
            queue = state["queue"]
            self.queue.clear()
            if isinstance(queue, list):
                self.queue.extend(int(b) & 0xFF for b in queue[-QUEUE_LIMIT:])
