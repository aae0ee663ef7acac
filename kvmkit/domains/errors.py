"""Errors raised by :mod:`kvmkit.domains`.

::

    KvmkitError
     └── QemuError
          └── VmStateError                (kvmkit.qemu.errors)
               └── DomainError             a verb the domain's state or definition forbids
                    ├── DefinitionError    a definition file or value that is not valid
                    ├── UntrustedStateError  a state file that cannot be read or trusted
                    └── InstallError       an install from an ISO that failed or timed out
"""

from __future__ import annotations

from kvmkit.qemu.errors import VmStateError


class DomainError(VmStateError):
    """The domain's state or definition forbids the operation, or it names no domain."""


class DefinitionError(DomainError):
    """A definition (file or value) that is not valid; the message names the field."""

    exit_status = 2


class UntrustedStateError(DomainError):
    """A state file that cannot be read or does not describe a QEMU kvmkit started: a
    QEMU may still run for the domain, so nothing is started or signalled."""


class InstallError(DomainError):
    """The installer reported a failure, stopped half-way, or did not finish in time."""
