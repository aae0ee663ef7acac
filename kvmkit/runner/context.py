"""What devices may touch while the guest runs: the console, guest memory, the
boot-timer marks, and the request to end the run."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from kvmkit.kvm import Vm
from kvmkit.runner.stats import Mark


class GuestExit(Exception):
    """Raised by a device (exit port, exit hypercall) to end the run with ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class Console:
    """The guest's console: every byte is kept (for ``--json`` and tests) and, when
    ``echo`` is a stream, written through to it as it arrives."""

    def __init__(self, echo: TextIO | None = None) -> None:
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._echo = echo

    def write(self, data: bytes) -> None:
        with self._lock:
            self._buf += data
            if self._echo is not None:
                out = getattr(self._echo, "buffer", None)
                if out is not None:
                    out.write(data)
                else:
                    self._echo.write(data.decode("utf-8", "replace"))
                self._echo.flush()

    def text(self) -> str:
        with self._lock:
            return self._buf.decode("utf-8", "replace")


class RunContext:
    """Shared by every device and vCPU thread of one run."""

    def __init__(self, vm: Vm, *, echo: TextIO | None = sys.stdout) -> None:
        self.vm = vm
        self.console = Console(echo)
        self.start_ns = time.monotonic_ns()
        self._marks: list[Mark] = []
        self._marks_lock = threading.Lock()
        self._thread = threading.local()

    @property
    def vcpu_index(self) -> int:
        """The index of the vCPU whose thread is asking (0 outside vCPU threads)."""
        return getattr(self._thread, "vcpu", 0)

    def bind_vcpu_thread(self, index: int) -> None:
        """Called by a vCPU thread before it runs, so devices know which vCPU calls."""
        self._thread.vcpu = index

    def add_mark(self, label: str, at_ns: int, vcpu: int) -> None:
        with self._marks_lock:
            self._marks.append(Mark(label, (at_ns - self.start_ns) / 1e9, vcpu))

    @property
    def marks(self) -> list[Mark]:
        with self._marks_lock:
            return list(self._marks)
