"""kvmkit.qmp: an async QEMU Machine Protocol client native to trio.

Typical use::

    async with open_qmp("/run/vm/qmp.sock") as qmp:
        status = await qmp.execute("query-status")
        _, event = await qmp.execute_and_wait("stop", event="STOP")
        async with qmp.listen("RESUME") as events:
            await qmp.execute("cont")
            async for event in events:
                break

Layers: :mod:`kvmkit.qmp.protocol` (no I/O), :mod:`kvmkit.qmp.client` (trio),
:mod:`kvmkit.qmp.events` (listeners), :mod:`kvmkit.qmp.schema` (live schema checks),
:mod:`kvmkit.qmp.sync` (blocking facade).  Messages, the greeting model and
``ExecuteError`` are qemu.qmp's own; kvmkit's errors derive from qemu.qmp's ``QMPError``
as well as from :class:`kvmkit.errors.KvmkitError`.
"""

from qemu.qmp import ExecuteError, Message

from kvmkit.qmp.client import (
    DEFAULT_COMMAND_TIMEOUT,
    DEFAULT_EVENT_TIMEOUT,
    QMPClient,
    open_qmp,
)
from kvmkit.qmp.errors import (
    BadReplyError,
    ConnectError,
    DisconnectedError,
    EventOverflowError,
    MessageTooLargeError,
    QMPError,
    QMPProtocolError,
    QMPTimeoutError,
    SchemaError,
    UsageError,
)
from kvmkit.qmp.events import EventListener, data_matches
from kvmkit.qmp.protocol import MAX_MESSAGE_SIZE, QMPProtocol
from kvmkit.qmp.schema import Schema

__all__ = [
    # Entry points and classes, most important first
    "open_qmp",
    "QMPClient",
    "EventListener",
    "Message",
    "Schema",
    "QMPProtocol",
    "data_matches",
    # Errors, most generic first
    "QMPError",
    "ConnectError",
    "DisconnectedError",
    "QMPTimeoutError",
    "ExecuteError",
    "QMPProtocolError",
    "MessageTooLargeError",
    "BadReplyError",
    "SchemaError",
    "EventOverflowError",
    "UsageError",
    # Constants
    "DEFAULT_COMMAND_TIMEOUT",
    "DEFAULT_EVENT_TIMEOUT",
    "MAX_MESSAGE_SIZE",
]
