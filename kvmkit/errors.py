"""kvmkit's error hierarchy.

Every error kvmkit raises on purpose derives from :class:`KvmkitError`, so a caller (and the
CLI) can catch one class and print a message that says what went wrong and what to do::

    KvmkitError
     ├── KvmError                      kvmkit.kvm: /dev/kvm and its ioctls
     │    ├── KvmUnavailableError      no /dev/kvm, no permission, wrong API version
     │    ├── KvmIoctlError            an ioctl failed (names the ioctl, errno, object)
     │    ├── ClosedError              a call on a Kvm/Vm/Vcpu/GuestMemory already closed
     │    ├── MemoryLayoutError        overlapping, misaligned, empty or oversized regions,
     │    │                            no free slot
     │    └── GuestMemoryAccessError   read/write outside a region
     ├── RunnerError                   kvmkit.runner (defined there)
     ├── QMP errors                    kvmkit.qmp (also derive from qemu.qmp.QMPError)
     └── QEMU errors                   kvmkit.qemu (defined there)

Errors carry a one-line ``str()`` suitable for a terminal; ``hint`` says what to do when
there is something useful to say.
"""

from __future__ import annotations


class KvmkitError(Exception):
    """Root of every error kvmkit raises on purpose.

    ``exit_status`` is what the ``kvmkit`` command exits with when this error reaches it.
    """

    exit_status: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class KvmError(KvmkitError):
    """Something about /dev/kvm or one of its ioctls went wrong."""


class KvmUnavailableError(KvmError):
    """/dev/kvm is missing, not accessible, or speaks an API kvmkit does not know."""


class KvmIoctlError(KvmError):
    """An ioctl failed; names the ioctl, the errno and the object it was called on."""

    def __init__(self, ioctl: str, errno_: int, target: str, *, hint: str | None = None) -> None:
        import os

        self.ioctl = ioctl
        self.errno = errno_
        self.target = target
        super().__init__(
            f"{ioctl} on {target} failed: [errno {errno_}] {os.strerror(errno_)}", hint=hint
        )


class ClosedError(KvmError):
    """A method was called on an object that has already been closed."""


class MemoryLayoutError(KvmError):
    """A guest memory region cannot be placed as asked."""


class GuestMemoryAccessError(KvmError):
    """A read or write fell (partly) outside guest memory."""
