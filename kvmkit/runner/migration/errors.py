"""Migration errors (:class:`~kvmkit.runner.errors.RunnerError`)::

MigrationError        the migration failed; the source keeps (or resumes) running
 ├── ProtocolError    the stream is malformed, cut short, of another version, or
 │                    does not match the destination
 └── TransportError   cannot connect/listen, the peer went away, a timeout
"""

from __future__ import annotations

from kvmkit.runner.errors import RunnerError


class MigrationError(RunnerError):
    """A migration failed.  The source guest was not handed over and keeps running."""

    exit_status = 1


class ProtocolError(MigrationError):
    """The migration stream is malformed, truncated, or of another version."""


class TransportError(MigrationError):
    """The connection could not be made, broke, or timed out."""
