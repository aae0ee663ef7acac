"""What devices may touch while the guest runs: the console, guest memory, the
interrupt lines, the boot-timer marks, and the requests that end the run (exit, reset,
power-off)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from kvmkit.kvm import Vm
from kvmkit.runner.irq import InterruptLines, NoInterrupts
from kvmkit.runner.stats import Mark

#: Console bytes kept for ``--json`` and :attr:`RunResult.console` (the stream itself is
#: unbounded: every byte is echoed as it arrives).
DEFAULT_CONSOLE_LIMIT = 1 << 20
#: Boot-timer marks kept per run; later ones are counted in ``marks_dropped``.
MAX_MARKS = 4096


class GuestExit(Exception):
    """Raised by a device (exit port, exit hypercall) to end the run with ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class Console:
    """The guest's console: the last ``limit`` bytes are kept (for ``--json`` and
    tests) and, when ``echo`` is a stream, every byte is written through as it arrives.

    Memory is bounded whatever the guest writes: at most twice ``limit`` (plus 64 KiB)
    and one write; the buffer is trimmed only when it reaches that, so a guest writing a
    byte at a time costs no copy of the whole buffer per byte.
    If the echo stream goes away (a closed pipe), echoing stops and the run goes on;
    ``echo_lost`` says so.
    """

    def __init__(self, echo: TextIO | None = None, *, limit: int = DEFAULT_CONSOLE_LIMIT) -> None:
        if limit < 0:
            raise ValueError(f"console limit {limit}: give 0 or more bytes")
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._echo = echo
        self.limit = limit
        self.total = 0
        self.echo_lost = False

    @property
    def dropped(self) -> int:
        """Bytes the guest wrote that are no longer kept (the oldest ones)."""
        return self.total - min(len(self._buf), self.limit)

    def write(self, data: bytes) -> None:
        with self._lock:
            self.total += len(data)
            self._buf += data
            if len(self._buf) > 2 * self.limit + (64 << 10):
                del self._buf[: len(self._buf) - self.limit]
            if self._echo is not None:
                self._echo_write(data)

    def _echo_write(self, data: bytes) -> None:
        try:
            echo = self._echo
            if echo is None:
                return
            out = getattr(echo, "buffer", None)
            if out is not None:
                out.write(data)
            else:
                echo.write(data.decode("utf-8", "replace"))
            echo.flush()
        except (BrokenPipeError, ValueError, OSError):  # reader gone or stream closed
            self._echo = None
            self.echo_lost = True

    def text(self) -> str:
        """The last ``limit`` bytes, decoded (UTF-8, bad bytes replaced)."""
        with self._lock:
            keep = self._buf[max(len(self._buf) - self.limit, 0) :] if self.limit else b""
            return bytes(keep).decode("utf-8", "replace")


class RunContext:
    """Shared by every device and vCPU thread of one run.

    ``irq`` is how devices raise interrupts (:class:`~kvmkit.runner.irq.IrqChipLines` on
    a VM with the in-kernel irqchip, :class:`NoInterrupts` on the bare machine).
    """

    def __init__(
        self,
        vm: Vm,
        *,
        echo: TextIO | None = sys.stdout,
        console: Console | None = None,
        irq: InterruptLines | None = None,
    ) -> None:
        self.vm = vm
        self.console = console if console is not None else Console(echo)
        self.irq: InterruptLines = irq if irq is not None else NoInterrupts()
        self.start_ns = time.monotonic_ns()
        self._marks: list[Mark] = []
        self.marks_dropped = 0
        self._marks_lock = threading.Lock()
        self._thread = threading.local()
        #: ``(kind, reason)`` once a device asked to end the run: ``reset`` or ``poweroff``.
        self.stop_request: tuple[str, str] | None = None
        #: Set by the machine: stops every vCPU (sets its stopping flag and kicks them).
        self.stop_hook: Callable[[], None] | None = None

    @property
    def vcpu_index(self) -> int:
        """The index of the vCPU whose thread is asking (0 outside vCPU threads)."""
        return getattr(self._thread, "vcpu", 0)

    def bind_vcpu_thread(self, index: int) -> None:
        """Called by a vCPU thread before it runs, so devices know which vCPU calls."""
        self._thread.vcpu = index

    def add_mark(self, label: str, at_ns: int, vcpu: int) -> None:
        with self._marks_lock:
            if len(self._marks) >= MAX_MARKS:
                self.marks_dropped += 1
                return
            self._marks.append(Mark(label, (at_ns - self.start_ns) / 1e9, vcpu))

    @property
    def marks(self) -> list[Mark]:
        with self._marks_lock:
            return list(self._marks)

    # ---- ending the run from a device ------------------------------------------------
    def request_reset(self, reason: str) -> None:
        """A device (0xcf9, the keyboard controller, port 0x92) resets the machine.

        Every vCPU stops at its next exit; the machine then restarts the guest from its
        image (``--reboot``) or ends the run with reason ``reset``.  Safe from any
        thread; the first request wins.  Returns at once: the caller goes on normally.
        """
        self._request_stop("reset", reason)

    def request_poweroff(self, reason: str) -> None:
        """A device (e.g. ACPI S5) turns the machine off: the run ends with reason
        ``poweroff`` and status 0.  Safe from any thread; the first request wins."""
        self._request_stop("poweroff", reason)

    def _request_stop(self, kind: str, reason: str) -> None:
        with self._marks_lock:
            if self.stop_request is None:
                self.stop_request = (kind, reason)
        if self.stop_hook is not None:
            self.stop_hook()
