"""An 8250 UART subset at 0x3f8: enough for a polled console.

THR writes go to the console; LSR always reports the transmitter empty (and no input);
IER, LCR, MCR, scratch and the divisor latch keep what the guest wrote.
"""

from __future__ import annotations

from kvmkit.runner.context import Console

COM1_PORT = 0x3F8
_LSR_THRE = 0x20
_LSR_TEMT = 0x40
_LCR_DLAB = 0x80


class Uart8250:
    name = "uart8250"

    def __init__(self, console: Console, base: int = COM1_PORT) -> None:
        self.console = console
        self.base = base
        self.ier = 0
        self.lcr = 0x03
        self.mcr = 0
        self.scr = 0
        self.dll = 0x01
        self.dlm = 0

    def io_out(self, port: int, size: int, data: bytes) -> None:
        reg = port - self.base
        value = data[0]
        dlab = self.lcr & _LCR_DLAB
        if reg == 0:
            if dlab:
                self.dll = value
            else:
                self.console.write(bytes([value]))
        elif reg == 1:
            if dlab:
                self.dlm = value
            else:
                self.ier = value & 0x0F
        elif reg == 3:
            self.lcr = value
        elif reg == 4:
            self.mcr = value & 0x1F
        elif reg == 7:
            self.scr = value
        # FCR (2) and writes to LSR/MSR are accepted and ignored

    def io_in(self, port: int, size: int) -> int:
        reg = port - self.base
        dlab = self.lcr & _LCR_DLAB
        if reg == 0:
            return self.dll if dlab else 0  # no input ever arrives
        if reg == 1:
            return self.dlm if dlab else self.ier
        if reg == 2:
            return 0x01  # IIR: no interrupt pending
        if reg == 3:
            return self.lcr
        if reg == 4:
            return self.mcr
        if reg == 5:
            return _LSR_THRE | _LSR_TEMT
        if reg == 6:
            return 0xB0 if self.mcr & 0x10 else 0  # loopback: CTS/DSR/DCD follow MCR
        return self.scr
