"""Event listeners: filtered, bounded, per-consumer queues of QMP events.

A listener is created by :meth:`kvmkit.qmp.QMPClient.listen` and is an async context
manager (entering subscribes it, leaving unsubscribes it) and an async iterator of
qemu.qmp :class:`~qemu.qmp.Message` events (``event``, ``data``, ``timestamp``).

A listener sees the events that arrive while it is entered, not earlier ones: enter it
before doing what causes the event (``execute_and_wait`` does exactly that).

Filters: ``names`` (none means every event) and ``match``, a dict that matches when each
of its keys is present in the event's ``data`` with an equal value; nested dicts are
compared the same way, recursively.

Buffer policy when the consumer falls behind: every listener holds at most ``buffer``
events (the reader never blocks on a slow listener, so replies keep flowing).  With
``overflow="error"`` (the default) events that find the buffer full are dropped and
counted, and the consumer gets an :class:`~kvmkit.qmp.errors.EventOverflowError` once it
has read the events buffered before the gap, so a loss is never silent.  With
``overflow="drop-oldest"`` the oldest buffered event makes room and ``dropped`` counts
the losses (for consumers that only care about recent state).  With ``overflow="block"``
nothing is lost: a full listener makes the client's reader wait until the consumer has
read one (back-pressure; replies wait too, so use it only for a consumer that keeps
reading, such as ``kvmkit qmp --events``).

When the connection is lost the consumer first gets the buffered events, then
:class:`~kvmkit.qmp.errors.DisconnectedError`; when the client is closed on purpose,
iteration simply ends.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import trio
from qemu.qmp import Message

from kvmkit.qmp.errors import (
    DisconnectedError,
    EventOverflowError,
    QMPTimeoutError,
    UsageError,
    check_timeout,
)

if TYPE_CHECKING:
    from kvmkit.qmp.client import QMPClient

#: Default number of events a listener buffers before its overflow policy applies.
DEFAULT_BUFFER = 1024

Overflow = Literal["error", "drop-oldest", "block"]
OVERFLOW_POLICIES = ("error", "drop-oldest", "block")


def data_matches(data: Any, match: Mapping[str, Any]) -> bool:
    """True if every key of ``match`` is in ``data`` with an equal value (dicts recurse)."""
    if not isinstance(data, Mapping):
        return False
    for key, want in match.items():
        if key not in data:
            return False
        have = data[key]
        if isinstance(want, Mapping):
            if not data_matches(have, want):
                return False
        elif have != want:
            return False
    return True


class EventListener:
    """A filtered queue of events for one consumer.  Create with ``QMPClient.listen``."""

    def __init__(
        self,
        client: QMPClient,
        names: Iterable[str] = (),
        match: Mapping[str, Any] | None = None,
        *,
        buffer: int = DEFAULT_BUFFER,
        overflow: Overflow = "error",
    ) -> None:
        if buffer < 1:
            raise UsageError(f"an event listener needs a buffer of at least 1, not {buffer}")
        if overflow not in OVERFLOW_POLICIES:
            raise UsageError(
                f"unknown overflow policy {overflow!r}",
                hint="use " + ", ".join(repr(p) for p in OVERFLOW_POLICIES),
            )
        self._client = client
        self.names: frozenset[str] | None = frozenset(names) or None
        self.match = dict(match) if match else None
        self.buffer = buffer
        self.overflow = overflow
        #: Number of events lost to the overflow policy.
        self.dropped = 0
        self._queue: deque[Message] = deque()
        self._wakeup: trio.Event | None = None
        self._room: trio.Event | None = None
        self._end: BaseException | None = None
        self._ended = False

    # -- called by the client's reader ---------------------------------------------------

    def wants(self, name: str, message: Message) -> bool:
        if self.names is not None and name not in self.names:
            return False
        if self.match is not None:
            return data_matches(message.get("data", {}), self.match)
        return True

    def push(self, message: Message) -> bool:
        """Queue ``message`` under the overflow policy; False only when the buffer is
        full and the policy is ``block`` (the caller then awaits :meth:`put`)."""
        if len(self._queue) >= self.buffer:
            if self.overflow == "block":
                return self._ended  # an ended listener takes nothing more: do not wait
            self.dropped += 1
            if self.overflow == "drop-oldest":
                self._queue.popleft()
            else:
                return True
        elif self.dropped and self.overflow == "error":
            # Once events were lost, do not deliver later ones as if nothing happened.
            self.dropped += 1
            return True
        self._queue.append(message)
        if self._wakeup is not None:
            self._wakeup.set()
        return True

    async def put(self, message: Message) -> None:
        """Wait until the buffer has room (or the listener ended), then queue
        ``message``: the reader's side of ``overflow="block"``."""
        while not self.push(message):
            self._room = trio.Event()
            await self._room.wait()

    def end(self, exc: BaseException | None) -> None:
        """No more events will come; ``exc`` is raised after the buffered ones, if given."""
        if self._ended:
            return
        self._ended = True
        self._end = exc
        if self._wakeup is not None:
            self._wakeup.set()
        if self._room is not None:
            self._room.set()

    # -- consumer side ---------------------------------------------------------------------

    async def __aenter__(self) -> EventListener:
        self._client._add_listener(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._client._remove_listener(self)
        self.end(None)

    def __aiter__(self) -> EventListener:
        return self

    async def __anext__(self) -> Message:
        while not self._queue:
            if self.dropped and self.overflow == "error":
                raise EventOverflowError(
                    f"an event listener fell behind: its buffer of {self.buffer} events "
                    f"filled up and {self.dropped} events were lost",
                    hint="consume events faster, raise buffer=, or use overflow='drop-oldest'",
                )
            if self._ended:
                if self._end is not None:
                    raise DisconnectedError(f"no more events: {self._end}") from self._end
                raise StopAsyncIteration
            self._wakeup = trio.Event()
            try:
                await self._wakeup.wait()
            finally:
                self._wakeup = None
        await trio.lowlevel.checkpoint_if_cancelled()
        message = self._queue.popleft()
        if self._room is not None:
            self._room.set()
        return message

    async def get(self, timeout: float | None = None) -> Message:
        """The next event; raises QMPTimeoutError after ``timeout`` seconds (None: wait).

        Raises DisconnectedError (connection lost) or StopAsyncIteration (listener or
        client closed) when no event can come any more.
        """
        check_timeout(timeout)
        if timeout is None:
            return await self.__anext__()
        with trio.move_on_after(timeout):
            return await self.__anext__()
        raise QMPTimeoutError(self._timeout_text(timeout))

    def _timeout_text(self, timeout: float) -> str:
        what = ", ".join(sorted(self.names)) if self.names else "any event"
        if self.match:
            what += f" matching {self.match}"
        return f"no {what} within {timeout:g} s"

    def pending(self) -> int:
        """Events buffered and not yet consumed."""
        return len(self._queue)
