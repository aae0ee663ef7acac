"""An 8250/16550 UART at 0x3f8 (COM1) on IRQ 4, as QEMU's ``hw/char/serial.c`` behaves.

Transmit: THR writes go to the console at once (so the transmitter is always empty);
in loopback (MCR bit 4) they come back into the receiver instead.  Receive: bytes given
to :meth:`Uart8250.receive` (``kvmkit run`` forwards its stdin) wait in a FIFO of
:data:`RX_FIFO` bytes; LSR bit 0 says data is ready; the feeder waits when it is full,
so memory stays bounded.  Interrupts: the IIR reports the highest-priority pending
cause that the IER enables (line status, received data, THR empty, modem status) and the
IRQ line follows it (high while the IIR has an interrupt pending), through the
:class:`~kvmkit.runner.irq.InterruptLines` the UART was given.  Reading an IIR that
reports "THR empty" clears that cause, as on the real part.
"""

from __future__ import annotations

import os
import select
import threading
from collections import deque
from typing import Any

from kvmkit.runner.context import Console
from kvmkit.runner.irq import InterruptLines, NoInterrupts

COM1_PORT = 0x3F8
COM1_IRQ = 4
#: Receive FIFO depth (the 16550's).
RX_FIFO = 16

_IER_RDI, _IER_THRI, _IER_RLSI, _IER_MSI = 0x01, 0x02, 0x04, 0x08
_IIR_NONE, _IIR_MSI, _IIR_THRI, _IIR_RDI, _IIR_RLSI = 0x01, 0x00, 0x02, 0x04, 0x06
_IIR_FIFO_ON = 0xC0
_FCR_ENABLE, _FCR_CLEAR_RX = 0x01, 0x02
_LSR_DR, _LSR_OE, _LSR_THRE, _LSR_TEMT = 0x01, 0x02, 0x20, 0x40
_LSR_ERRORS = 0x1E
_LCR_DLAB = 0x80
_MCR_LOOP = 0x10


class Uart8250:
    """An 8250 UART at ``base``: THR to the console, a bounded receive FIFO, IRQ 4."""

    name = "uart8250"

    def __init__(
        self,
        console: Console,
        base: int = COM1_PORT,
        *,
        irq: InterruptLines | None = None,
        gsi: int = COM1_IRQ,
    ) -> None:
        self.console = console
        self.base = base
        self.irq = irq if irq is not None else NoInterrupts()
        self.gsi = gsi
        self._lock = threading.Condition()
        self.ier = 0
        self.lcr = 0x03
        self.mcr = 0
        self.scr = 0
        self.fcr = 0
        self.dll = 0x01
        self.dlm = 0
        self.lsr_errors = 0
        self.thr_ipending = False
        self.rx: deque[int] = deque()
        self._level = False

    # ---- interrupt state ------------------------------------------------------------
    def _iir(self) -> int:
        if self.ier & _IER_RLSI and self.lsr_errors:
            cause = _IIR_RLSI
        elif self.ier & _IER_RDI and self.rx:
            cause = _IIR_RDI
        elif self.ier & _IER_THRI and self.thr_ipending:
            cause = _IIR_THRI
        else:
            cause = _IIR_NONE  # no modem-status changes are ever reported
        return cause | (_IIR_FIFO_ON if self.fcr & _FCR_ENABLE else 0)

    def _update_irq(self) -> None:
        level = not self._iir() & _IIR_NONE
        if level != self._level:
            self._level = level
            self.irq.set_level(self.gsi, level)

    # ---- the guest's side -------------------------------------------------------------
    def io_out(self, port: int, size: int, data: bytes) -> None:
        reg = port - self.base
        value = data[0]
        with self._lock:
            dlab = self.lcr & _LCR_DLAB
            if reg == 0 and dlab:
                self.dll = value
            elif reg == 0:
                self._transmit(value)
            elif reg == 1 and dlab:
                self.dlm = value
            elif reg == 1:
                if (value ^ self.ier) & _IER_THRI:
                    # as QEMU: turning THRI on raises "THR empty" at once (the
                    # transmitter is always empty here); turning it off forgets it
                    self.thr_ipending = bool(value & _IER_THRI)
                self.ier = value & 0x0F
            elif reg == 2:
                self.fcr = value & 0xC9
                if value & _FCR_CLEAR_RX or not value & _FCR_ENABLE:
                    self.rx.clear()
                    self._lock.notify_all()
            elif reg == 3:
                self.lcr = value
            elif reg == 4:
                self.mcr = value & 0x1F
            elif reg == 7:
                self.scr = value
            # writes to LSR/MSR are accepted and ignored
            self._update_irq()

    def _transmit(self, value: int) -> None:
        self.thr_ipending = False
        self._update_irq()
        if self.mcr & _MCR_LOOP:
            self._push(value)
        else:
            self.console.write(bytes([value]))
        self.thr_ipending = True  # sent at once: the THR is empty again

    def io_in(self, port: int, size: int) -> int:
        reg = port - self.base
        with self._lock:
            dlab = self.lcr & _LCR_DLAB
            if reg == 0:
                if dlab:
                    return self.dll
                value = self.rx.popleft() if self.rx else 0
                self._lock.notify_all()
                self._update_irq()
                return value
            if reg == 1:
                return self.dlm if dlab else self.ier
            if reg == 2:
                iir = self._iir()
                if iir & 0x0F == _IIR_THRI:
                    self.thr_ipending = False
                    self._update_irq()
                return iir
            if reg == 3:
                return self.lcr
            if reg == 4:
                return self.mcr
            if reg == 5:
                lsr = _LSR_THRE | _LSR_TEMT | self.lsr_errors | (_LSR_DR if self.rx else 0)
                self.lsr_errors = 0
                self._update_irq()
                return lsr
            if reg == 6:
                return 0xB0 if self.mcr & _MCR_LOOP else 0  # loopback: CTS/DSR/DCD follow MCR
            return self.scr

    # ---- the host's side -------------------------------------------------------------
    def _push(self, value: int) -> bool:
        if len(self.rx) >= RX_FIFO:
            self.lsr_errors |= _LSR_OE  # overrun: the byte is lost, as on the real part
            return False
        self.rx.append(value)
        return True

    def receive(self, data: bytes, timeout: float | None = None) -> int:
        """Put ``data`` into the receive FIFO as room frees up; returns how many bytes
        went in (fewer than ``len(data)`` only if ``timeout`` passed with the FIFO
        full).  Called from a host thread, never a vCPU's."""
        done = 0
        with self._lock:
            while done < len(data):
                if len(self.rx) >= RX_FIFO and not self._lock.wait_for(
                    lambda: len(self.rx) < RX_FIFO, timeout
                ):
                    break
                self.rx.append(data[done])
                done += 1
                self._update_irq()
        return done

    def save(self) -> dict[str, Any]:
        with self._lock:
            return {
                "ier": self.ier,
                "lcr": self.lcr,
                "mcr": self.mcr,
                "scr": self.scr,
                "fcr": self.fcr,
                "dll": self.dll,
                "dlm": self.dlm,
                "lsr_errors": self.lsr_errors,
                "thr_ipending": int(self.thr_ipending),
                "rx": list(self.rx),
            }

    def load(self, state: dict[str, Any]) -> None:
        with self._lock:
            self.ier = int(state["ier"]) & 0x0F
            self.lcr = int(state["lcr"]) & 0xFF
            self.mcr = int(state["mcr"]) & 0x1F
            self.scr = int(state["scr"]) & 0xFF
            self.fcr = int(state["fcr"]) & 0xC9
            self.dll = int(state["dll"]) & 0xFF
            self.dlm = int(state["dlm"]) & 0xFF
            self.lsr_errors = int(state["lsr_errors"]) & _LSR_ERRORS
            self.thr_ipending = bool(state["thr_ipending"])
            self.rx = deque(int(b) & 0xFF for b in list(state["rx"])[:RX_FIFO])
            self._level = False
            self._update_irq()


def forward_input(uart: Uart8250, fd: int, stop: threading.Event) -> threading.Thread:
    """Start a daemon thread that feeds what arrives on ``fd`` (a terminal or a pipe)
    into ``uart`` until end of file or ``stop``.  At most 256 bytes wait in the thread;
    the rest waits in the pipe, so memory stays bounded."""

    def body() -> None:
        while not stop.is_set():
            ready, _, _ = select.select([fd], [], [], 0.1)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 256)
            except OSError:
                return
            if not chunk:
                return
            while chunk and not stop.is_set():
                chunk = chunk[uart.receive(chunk, timeout=0.1) :]

    thread = threading.Thread(target=body, name="uart-stdin", daemon=True)
    thread.start()
    return thread
