"""Typed results of ``Vcpu.run()``: one small class per kind of VM exit.

kvmkit never enables ``KVM_CAP_EXIT_HYPERCALL``, so ``KVM_EXIT_HYPERCALL`` cannot
happen; should a kernel produce it anyway it arrives as :class:`UnknownExit`.  (Guest
programs call the runner through port I/O, see ``kvmkit.runner.devices.hypercalls``.)

``IoIn`` and ``MmioRead`` must be answered with ``reply(data)`` before the next
``run()``; the data goes straight into the shared ``kvm_run`` page, where KVM picks it up
when the vCPU resumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    pass


class _Replier(Protocol):
    def _reply_io_in(self, data: bytes) -> None: ...

    def _reply_mmio_read(self, data: bytes) -> None: ...


def _as_bytes(data: bytes | int, width: int) -> bytes:
    """``data`` as bytes; an int becomes ``width`` little-endian bytes (truncated)."""
    if isinstance(data, int):
        return (data & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    return bytes(data)


@dataclass(frozen=True, slots=True)
class IoOut:
    """The guest wrote ``data`` (``size`` bytes per item, ``count`` items) to ``port``."""

    port: int
    size: int
    data: bytes
    count: int = 1

    @property
    def value(self) -> int:
        """The first item as a little-endian integer (what ``out`` wrote)."""
        return int.from_bytes(self.data[: self.size], "little")


@dataclass(frozen=True, slots=True)
class IoIn:
    """The guest reads ``size`` bytes (``count`` items) from ``port``; answer with ``reply``."""

    port: int
    size: int
    count: int = 1
    _vcpu: _Replier | None = field(default=None, repr=False, compare=False)

    def reply(self, data: bytes | int) -> None:
        """Supply what the guest reads: bytes (``size*count`` long) or an int."""
        assert self._vcpu is not None, "IoIn built by hand has no vCPU to answer"
        self._vcpu._reply_io_in(
            _as_bytes(data, self.size) * (self.count if isinstance(data, int) else 1)
        )


@dataclass(frozen=True, slots=True)
class MmioWrite:
    """The guest wrote ``data`` to guest-physical ``addr`` outside any memory slot."""

    addr: int
    data: bytes

    @property
    def value(self) -> int:
        return int.from_bytes(self.data, "little")


@dataclass(frozen=True, slots=True)
class MmioRead:
    """The guest reads ``length`` bytes from ``addr``; answer with ``reply``."""

    addr: int
    length: int
    _vcpu: _Replier | None = field(default=None, repr=False, compare=False)

    def reply(self, data: bytes | int) -> None:
        assert self._vcpu is not None, "MmioRead built by hand has no vCPU to answer"
        self._vcpu._reply_mmio_read(_as_bytes(data, self.length))


@dataclass(frozen=True, slots=True)
class Hlt:
    """The guest executed HLT (with no in-kernel irqchip to wait for an interrupt)."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Triple fault or another shutdown condition: the vCPU cannot continue."""


@dataclass(frozen=True, slots=True)
class FailEntry:
    """The hardware refused to enter the guest (invalid guest state)."""

    reason: int
    cpu: int = 0


@dataclass(frozen=True, slots=True)
class InternalError:
    """KVM could not handle an exit (e.g. emulation failure); ``data`` is KVM's detail."""

    suberror: int
    data: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Debug:
    """A debug exit (single-step or breakpoint) at guest ``pc``."""

    pc: int
    exception: int = 0
    dr6: int = 0
    dr7: int = 0


@dataclass(frozen=True, slots=True)
class SystemEvent:
    """A system event (shutdown, reset, crash) requested through the in-kernel devices."""

    type: int
    data: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Interrupted:
    """``run()`` returned without guest progress: a kick, a signal or immediate_exit."""


@dataclass(frozen=True, slots=True)
class IrqWindowOpen:
    """The guest can take an interrupt now (after ``request_interrupt_window``)."""


@dataclass(frozen=True, slots=True)
class UnknownExit:
    """An exit reason kvmkit does not model; ``reason`` is the raw ``KVM_EXIT_*``."""

    reason: int
    hardware_reason: int = 0


VcpuExit = (
    IoOut
    | IoIn
    | MmioWrite
    | MmioRead
    | Hlt
    | Shutdown
    | FailEntry
    | InternalError
    | Debug
    | SystemEvent
    | Interrupted
    | IrqWindowOpen
    | UnknownExit
)

#: The exits that carry no data are singletons: ``run()`` returns these very objects.
HLT = Hlt()
SHUTDOWN = Shutdown()
INTERRUPTED = Interrupted()
IRQ_WINDOW_OPEN = IrqWindowOpen()


def exit_name(exit: VcpuExit) -> str:
    """A short lowercase name for statistics: ``io_out``, ``mmio_read``, ``hlt``..."""
    return _NAMES[type(exit)]


_NAMES: dict[type, str] = {
    IoOut: "io_out",
    IoIn: "io_in",
    MmioWrite: "mmio_write",
    MmioRead: "mmio_read",
    Hlt: "hlt",
    Shutdown: "shutdown",
    FailEntry: "fail_entry",
    InternalError: "internal_error",
    Debug: "debug",
    SystemEvent: "system_event",
    Interrupted: "interrupted",
    IrqWindowOpen: "irq_window_open",
    UnknownExit: "unknown",
}
