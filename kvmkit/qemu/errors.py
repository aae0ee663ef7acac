"""Errors raised by :mod:`kvmkit.qemu`.

::

    KvmkitError
     └── QemuError                     anything about a QEMU guest or its tools
          ├── GuestKitError            building or finding the guest kit failed
          ├── QemuImgError             qemu-img failed (names the command and its stderr)
          ├── LaunchError              QEMU exited or never answered while starting
          ├── MachineStateError        an operation that the machine's state forbids
          ├── ConsoleError             serial console: timeout waiting for output, closed
          │    └── ConsoleTimeout
          ├── HotplugError             a device/CPU/memory operation did not complete
          │    └── UnsupportedOperation  refused up front because it is unsafe here
          ├── SnapshotError            snapshot-save/-load/-delete job failed
          ├── MigrationError           migration failed, was cancelled, or the peer died
          └── VmStateError             `kvmkit vm` state directory problems (locks, names)
"""

from __future__ import annotations

from kvmkit.errors import KvmkitError


class QemuError(KvmkitError):
    """Root of the errors about QEMU guests and QEMU tools."""


class GuestKitError(QemuError):
    """The guest kit could not be built or is not cached."""


class QemuImgError(QemuError):
    """``qemu-img`` failed; the message carries the command and its error output."""


class LaunchError(QemuError):
    """QEMU did not start: carries the exit code, the command line and the log tail."""

    def __init__(
        self,
        message: str,
        *,
        exit_code: int | None = None,
        cmdline: list[str] | None = None,
        log_tail: str = "",
        hint: str | None = None,
    ) -> None:
        self.exit_code = exit_code
        self.cmdline = list(cmdline or [])
        self.log_tail = log_tail
        parts = [message]
        if exit_code is not None:
            parts.append(f"exit code {exit_code}")
        if log_tail.strip():
            parts.append("QEMU said: " + " | ".join(log_tail.strip().splitlines()[-5:]))
        if self.cmdline:
            parts.append("command line: " + " ".join(self.cmdline))
        super().__init__("; ".join(parts), hint=hint)


class MachineStateError(QemuError):
    """The machine is not in a state where the operation is possible."""


class ConsoleError(QemuError):
    """The serial console closed or misbehaved."""


class ConsoleTimeout(ConsoleError):
    """Expected output did not appear on the serial console in time."""


class HotplugError(QemuError):
    """A hotplug or unplug operation did not complete."""


class UnsupportedOperation(HotplugError):
    """Refused before trying: QEMU or the guest cannot do this safely here."""

    exit_status = 2


class SnapshotError(QemuError):
    """A snapshot job failed."""


class MigrationError(QemuError):
    """A migration failed, was cancelled, or its destination died."""


class VmStateError(QemuError):
    """The `kvmkit vm` state directory is inconsistent, locked, or names an unknown VM."""
