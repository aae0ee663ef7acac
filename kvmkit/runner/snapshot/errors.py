"""The snapshot error (a :class:`~kvmkit.runner.errors.RunnerError`)."""

from __future__ import annotations

from kvmkit.runner.errors import RunnerError


class SnapshotError(RunnerError):
    """A snapshot cannot be written, or cannot be restored on this host: truncated or
    corrupted, another format version, a KVM capability this host lacks, a different
    vCPU count.  Raised before any guest runs on its memory."""

    exit_status = 2
