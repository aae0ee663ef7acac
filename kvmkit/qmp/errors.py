"""Errors of kvmkit's QMP client.

Every error here derives from both :class:`kvmkit.errors.KvmkitError` (so the CLI and
kvmkit callers catch one root) and :class:`qemu.qmp.QMPError` (so code written against
qemu.qmp keeps working).  Where qemu.qmp has a matching class, kvmkit's error derives from
it too.  A failed command is reported with qemu.qmp's own :class:`qemu.qmp.ExecuteError`,
unchanged::

    KvmkitError                     qemu.qmp.QMPError
     └── QMPError ──────────────────────┘
          ├── ConnectError              (+ qemu.qmp.ConnectError) could not connect, no or
          │                             bad greeting, negotiation failed, connect timeout
          ├── DisconnectedError         (+ qemu.qmp.ExecInterruptedError) the connection
          │                             was lost or closed; pending calls fail with it
          ├── QMPTimeoutError           (+ TimeoutError) a reply or event did not come in time
          ├── QMPProtocolError          (+ qemu.qmp.error.ProtocolError) the server broke the
          │    │                        protocol: malformed JSON, a non-object message
          │    ├── MessageTooLargeError a message exceeded the maximum size
          │    └── BadReplyError        a reply with neither "return" nor a valid "error"
          ├── SchemaError               a command or its arguments do not fit the live schema
          ├── EventOverflowError        a listener fell behind and its buffer overflowed
          └── UsageError                the client was used wrongly (bad address, fd
                                        passing over a non-unix transport, ...)

    qemu.qmp.ExecuteError              the server answered a command with an error
                                       (``error_class``, ``str()`` is the description)

Every error's ``str()`` is one line saying what went wrong; ``hint`` says what to do.
The root cause, where there is one, is chained as ``__cause__``.
"""

from __future__ import annotations

import qemu.qmp
import qemu.qmp.error

from kvmkit.errors import KvmkitError


class QMPError(KvmkitError, qemu.qmp.QMPError):
    """Root of every error kvmkit's QMP client raises on purpose (except ExecuteError)."""


class ConnectError(QMPError, qemu.qmp.ConnectError):
    """Connecting, reading the greeting or negotiating capabilities failed.

    ``exc`` is the root cause (also ``__cause__``), or None.
    """

    def __init__(
        self, message: str, exc: BaseException | None = None, *, hint: str | None = None
    ) -> None:
        # qemu.qmp.ConnectError.__init__ wants (message, exc); set its attributes directly.
        Exception.__init__(self, message)
        self.message = message
        self.hint = hint
        self.error_message = message
        # qemu.qmp types ``exc`` as Exception (always set); kvmkit's may be None.
        self.exc = exc  # type: ignore[assignment]

    def __str__(self) -> str:
        text = self.message
        if self.exc is not None and str(self.exc):
            text = f"{text}: {self.exc}"
        if self.hint:
            text = f"{text} ({self.hint})"
        return text


class DisconnectedError(QMPError, qemu.qmp.ExecInterruptedError):
    """The connection is gone (lost, or closed by :meth:`QMPClient.aclose`).

    A command in flight when this happens may or may not have run; ask QEMU.
    """


class QMPTimeoutError(QMPError, TimeoutError):
    """A reply or an event did not arrive within the timeout given."""


class QMPProtocolError(QMPError, qemu.qmp.error.ProtocolError):
    """The server sent something QMP does not allow; the connection is closed."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        QMPError.__init__(self, message, hint=hint)
        self.error_message = message


class MessageTooLargeError(QMPProtocolError):
    """A message from the server exceeded the client's maximum message size."""


class BadReplyError(QMPProtocolError):
    """A reply carried neither "return" nor a well-formed "error" member."""


class SchemaError(QMPError):
    """A command, an argument name or an argument's type does not fit the live schema."""


class EventOverflowError(QMPError):
    """A listener's buffer filled up because its consumer fell behind; events were lost."""


class UsageError(QMPError):
    """The client was asked to do something it cannot do in its state or on its transport."""


def check_timeout(value: float | None, what: str = "timeout", *, allow_inf: bool = True) -> None:
    """Refuse a negative or NaN number of seconds (and infinity unless ``allow_inf``) with
    :class:`UsageError`; None passes (it means "the default")."""
    if value is None:
        return
    import math

    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError(f"{what} must be a number of seconds, not {value!r}")
    if math.isnan(value) or value < 0 or (math.isinf(value) and not allow_inf):
        raise UsageError(
            f"{what} must be a {'' if allow_inf else 'finite, '}non-negative number of "
            f"seconds, not {value!r}"
        )
