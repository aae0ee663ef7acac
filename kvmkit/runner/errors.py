"""Errors of the minimal VM runner.

::

    KvmkitError
     └── RunnerError
          ├── ImageError         a guest image is truncated, malformed or does not fit
          │                      (exit status 2 from the CLI; names the file and the fault)
          ├── BusError           overlapping device ranges; --strict access to nothing
          └── GuestCrashError    the guest triple-faulted or KVM could not run it
"""

from __future__ import annotations

from pathlib import Path

from kvmkit.errors import KvmkitError


class RunnerError(KvmkitError):
    """Something the runner was asked to do cannot be done."""


class ImageError(RunnerError):
    """A guest image cannot be loaded.  ``str()`` is one line: ``FILE: fault``."""

    exit_status = 2

    def __init__(self, path: str | Path, fault: str) -> None:
        self.path = Path(path)
        self.fault = fault
        super().__init__(f"{path}: {fault}")


class BusError(RunnerError):
    """Device ranges overlap, or (with ``strict``) the guest touched an unclaimed address."""

    exit_status = 3


class GuestCrashError(RunnerError):
    """The guest cannot continue (triple fault, failed entry, KVM internal error)."""

    exit_status = 125


class MachineEndedError(RunnerError):
    """The machine's run ended (the guest exited, crashed, reset) before its vCPUs could
    be paused for a snapshot or a migration: there is no running guest to save."""
