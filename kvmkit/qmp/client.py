"""The trio QMP client: :func:`open_qmp` and :class:`QMPClient`.

``open_qmp`` connects, starts a reader task and a writer task in its own nursery, waits
for the greeting and the capabilities negotiation, and yields a :class:`QMPClient`.  Any
number of tasks may call :meth:`QMPClient.execute` at once; each reply goes to its caller.
Messages are written whole and in order: a command is written straight to the socket when
it fits, otherwise it is queued for the writer task, so a caller that is cancelled or
times out never leaves half a message on the wire (its late reply is dropped quietly).

When the connection is lost, every call in flight fails at once with
:class:`~kvmkit.qmp.errors.DisconnectedError`, listeners get the same error after their
buffered events, and later calls fail immediately.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from typing import Any

import trio
from qemu.qmp import ExecuteError, Message
from qemu.qmp.models import ErrorResponse, Greeting

from kvmkit.qmp.errors import (
    BadReplyError,
    ConnectError,
    DisconnectedError,
    QMPError,
    QMPProtocolError,
    QMPTimeoutError,
    UsageError,
    check_timeout,
)
from kvmkit.qmp.events import DEFAULT_BUFFER, EventListener, Overflow
from kvmkit.qmp.protocol import (
    MAX_MESSAGE_SIZE,
    ClosedItem,
    DroppedReply,
    EventItem,
    GreetingItem,
    NegotiatedItem,
    QMPProtocol,
    ReplyItem,
)
from kvmkit.qmp.schema import Schema
from kvmkit.qmp.transport import Address, Transport, connect

logger = logging.getLogger("kvmkit.qmp")

#: Timeout of ``execute`` when the caller gives none (``math.inf`` disables it).
DEFAULT_COMMAND_TIMEOUT = 60.0
#: Timeout of ``wait_event`` and ``execute_and_wait`` when the caller gives none.
DEFAULT_EVENT_TIMEOUT = 30.0
# Callers wait before queueing more once this many bytes wait for the writer.
_HIGH_WATER = 1 << 20
#: With ``oob`` negotiated, at most this many in-band commands are written at a time (the
#: QMP spec's advice: the server stops reading beyond eight queued in-band commands, and
#: then an out-of-band command could not get through).  Others wait in the client.
IN_BAND_WINDOW = 8


class WarningLimit:
    """Aggregates repeated warnings of one kind, so a hostile or broken server cannot make
    the client log once per message without bound: the first :attr:`FIRST` of a kind are
    logged, then only the 10th, 100th, 1000th ... with the count so far."""

    FIRST = 3

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def allows(self, kind: str) -> bool:
        n = self.counts[kind] = self.counts.get(kind, 0) + 1
        if n <= self.FIRST:
            return True
        while n % 10 == 0:
            n //= 10
        return n == 1

    def suffix(self, kind: str) -> str:
        n = self.counts.get(kind, 0)
        return "" if n <= self.FIRST else f" ({n} so far; only every power of ten is logged)"


class _Waiter:
    """One caller waiting for its reply; woken with ``reply`` set, by the timer (reply
    None, ``timed_out``) or by a failed connection (reply None)."""

    __slots__ = ("event", "reply", "timed_out")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.reply: dict[str, Any] | None = None
        self.timed_out = False


class QMPClient(trio.abc.AsyncResource):
    """A live QMP connection.  Get one from :func:`open_qmp`; do not construct it."""

    def __init__(
        self,
        transport: Transport,
        *,
        negotiate: bool = True,
        max_message_size: int = MAX_MESSAGE_SIZE,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
        ids: bool = False,
    ) -> None:
        check_timeout(command_timeout, "command_timeout")
        self._transport = transport
        self._proto = QMPProtocol(negotiate=negotiate, max_message_size=max_message_size, ids=ids)
        self._window = trio.lowlevel.ParkingLot()
        self._pending: dict[int, _Waiter] = {}
        self._listeners: list[EventListener] = []
        self._out = bytearray()
        self._out_event = trio.Event()
        self._drained: trio.Event | None = None
        self._ready = trio.Event()
        self._error: BaseException | None = None
        self._closing = False
        self._cancel_tasks = trio.CancelScope()
        # Command timeouts: a heap of (deadline, seq, waiter) served by one timer task,
        # cheaper than a cancel scope per call.  Entries of answered calls are skipped.
        self._timers: list[tuple[float, int, _Waiter]] = []
        self._timer_seq = 0
        self._timer_scope = trio.CancelScope()
        #: Where this client is connected (for messages).
        self.address = transport.description
        #: Default timeout of :meth:`execute`, in seconds.
        self.command_timeout = command_timeout
        #: The live schema, once :meth:`load_schema` ran.
        self.schema: Schema | None = None
        self._validate = False
        #: The greeting as received (a qemu.qmp Message), once it arrived.
        self.greeting_message: Message | None = None
        self._warn_limit = WarningLimit()

    # -- state -------------------------------------------------------------------------

    @property
    def greeting(self) -> Greeting | None:
        """The server's greeting (qemu.qmp ``models.Greeting``); set by ``open_qmp``."""
        return self._proto.greeting

    @property
    def oob_enabled(self) -> bool:
        """True if out-of-band execution was negotiated."""
        return self._proto.oob_enabled

    @property
    def closed(self) -> bool:
        """True once the connection is lost or closed; calls then raise DisconnectedError."""
        return self._error is not None

    @property
    def in_flight(self) -> int:
        """Commands sent and not yet answered."""
        return len(self._pending)

    @property
    def dropped_replies(self) -> int:
        """Replies nobody waited for (unknown id, abandoned by a timed-out caller, ...)."""
        return self._proto.dropped_replies

    @property
    def can_pass_fds(self) -> bool:
        """True if :meth:`send_fd` works on this transport (a unix socket)."""
        return self._transport.can_pass_fds

    # -- commands ----------------------------------------------------------------------

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        oob: bool = False,
    ) -> Any:
        """Run ``command`` and return its ``return`` value.

        ``timeout`` is in seconds (None: :attr:`command_timeout`; ``math.inf``: none).
        Raises qemu.qmp's ``ExecuteError`` for an error reply, QMPTimeoutError when the
        reply does not come in time (the command may still run), DisconnectedError when
        the connection is lost, SchemaError when a loaded schema rejects the call.
        """
        if self._validate and self.schema is not None:
            self.schema.check(command, arguments, oob)
        return await self._call(command, arguments, timeout, oob, None)

    async def _call(
        self,
        command: str,
        arguments: Mapping[str, Any] | None,
        timeout: float | None,
        oob: bool,
        fds: list[int] | None,
    ) -> Any:
        if self._error is not None:
            raise self._gone(command)
        check_timeout(timeout)
        if timeout is None:
            timeout = self.command_timeout
        wait_time = timeout
        if (
            fds is not None
            or (self._out and len(self._out) > _HIGH_WATER)
            or (
                not oob
                and self._proto.in_band_in_flight >= IN_BAND_WINDOW
                and self._proto.oob_enabled
            )
        ):
            start = trio.current_time()
            await self._before_send(command, oob, fds, timeout)
            wait_time = max(0.0, timeout - (trio.current_time() - start))
        msg_id, data = self._proto.send_command(command, arguments, oob)
        # Send before any bookkeeping: the server's work starts sooner.  The reply cannot
        # be processed before this task yields, so registering the waiter after is safe.
        try:
            if fds is None:
                self._write(data)
            else:
                self._write_with_fds(data, fds)
        except BaseException:
            self._proto.forget(msg_id)
            raise
        waiter = _Waiter()
        pending = self._pending
        pending[msg_id] = waiter
        if wait_time != math.inf:
            self._arm_timer(waiter, wait_time)
        try:
            await waiter.event.wait()
        finally:
            if waiter.reply is None and pending.pop(msg_id, None) is not None:
                self._proto.abandon(msg_id)
        reply = waiter.reply
        if reply is None:
            if not waiter.timed_out:
                raise self._gone(command)
            raise QMPTimeoutError(
                f"no reply to {command!r} from {self.address} within {timeout:g} s",
                hint="the command may still complete; raise timeout= for slow commands",
            )
        if "return" in reply:
            return reply["return"]
        received = Message(reply, eager=False)
        sent = self._sent_message(
            command, arguments, oob, msg_id if oob or self._proto.ids else None
        )
        if "error" in reply:
            try:
                error = ErrorResponse(received)
            except (KeyError, TypeError) as exc:
                raise BadReplyError(
                    f"malformed error reply to {command!r}: {exc}: {reply!r}"
                ) from exc
            raise ExecuteError(error, sent, received)
        raise BadReplyError(f"reply to {command!r} has neither 'return' nor 'error': {reply!r}")

    @staticmethod
    def _sent_message(
        command: str, arguments: Mapping[str, Any] | None, oob: bool, msg_id: int | None
    ) -> Message:
        sent: dict[str, Any] = {"exec-oob" if oob else "execute": command}
        if arguments is not None:
            sent["arguments"] = dict(arguments)
        if msg_id is not None:
            sent["id"] = msg_id
        return Message(sent, eager=False)

    async def send_fd(self, fd: int, name: str, *, timeout: float | None = None) -> None:
        """Pass ``fd`` to QEMU with SCM_RIGHTS and name it ``name`` (QMP ``getfd``).

        The caller keeps ``fd`` open and owns it; QEMU holds its own copy until
        ``closefd``.  Needs a unix socket transport.
        """
        await self._call("getfd", {"fdname": name}, timeout, False, [fd])

    async def add_fd(
        self,
        fd: int,
        *,
        fdset_id: int | None = None,
        opaque: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Pass ``fd`` with SCM_RIGHTS into an fd set (QMP ``add-fd``); returns AddfdInfo."""
        args: dict[str, Any] = {}
        if fdset_id is not None:
            args["fdset-id"] = fdset_id
        if opaque is not None:
            args["opaque"] = opaque
        return await self._call("add-fd", args, timeout, False, [fd])

    # -- events ------------------------------------------------------------------------

    def listen(
        self,
        *names: str,
        match: Mapping[str, Any] | None = None,
        buffer: int = DEFAULT_BUFFER,
        overflow: Overflow = "error",
    ) -> EventListener:
        """A listener for events named ``names`` (none: all) whose data contains ``match``.

        Use as ``async with qmp.listen("STOP") as events: async for ev in events: ...``.
        Events are buffered from ``__aenter__`` on; see :mod:`kvmkit.qmp.events` for the
        buffer policy.
        """
        return EventListener(self, names, match, buffer=buffer, overflow=overflow)

    async def wait_event(
        self,
        name: str,
        match: Mapping[str, Any] | None = None,
        timeout: float = DEFAULT_EVENT_TIMEOUT,
    ) -> Message:
        """Wait for the next event ``name`` (arriving after this call) matching ``match``."""
        async with self.listen(name, match=match) as events:
            try:
                return await events.get(timeout)
            except StopAsyncIteration:
                raise self._gone(f"waiting for {name}") from None

    async def execute_and_wait(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        event: str,
        match: Mapping[str, Any] | None = None,
        timeout: float = DEFAULT_EVENT_TIMEOUT,
    ) -> tuple[Any, Message]:
        """Run ``command`` and wait for ``event`` (matching ``match``) it causes.

        The listener subscribes before the command is sent, so an event that arrives
        before the reply is not missed.  ``timeout`` covers the reply and the event.
        """
        check_timeout(timeout)
        deadline = trio.current_time() + timeout
        async with self.listen(event, match=match) as events:
            result = await self.execute(command, arguments, timeout=timeout)
            remaining = max(0.0, deadline - trio.current_time())
            try:
                message = await events.get(remaining)
            except QMPTimeoutError:
                raise QMPTimeoutError(
                    f"{command!r} succeeded but {events._timeout_text(timeout)}",
                    hint="the operation may still finish; raise timeout= or check its state",
                ) from None
            except StopAsyncIteration:
                raise self._gone(f"waiting for {event}") from None
        return result, message

    def _add_listener(self, listener: EventListener) -> None:
        if self._error is not None:
            listener.end(None if self._closing else self._error)
        self._listeners.append(listener)

    def _remove_listener(self, listener: EventListener) -> None:
        with suppress(ValueError):
            self._listeners.remove(listener)

    # -- schema ------------------------------------------------------------------------

    async def load_schema(self, *, validate: bool = True) -> Schema:
        """Read ``query-qmp-schema`` from the server; with ``validate``, check every later
        ``execute`` against it before sending."""
        raw = await self.execute("query-qmp-schema")
        self.schema = Schema(raw)
        self._validate = validate
        return self.schema

    # -- timeouts ----------------------------------------------------------------------

    def _arm_timer(self, waiter: _Waiter, timeout: float) -> None:
        deadline = trio.current_time() + timeout
        self._timer_seq += 1
        heapq.heappush(self._timers, (deadline, self._timer_seq, waiter))
        if deadline < self._timer_scope.deadline:
            self._timer_scope.deadline = deadline
        if len(self._timers) > 2 * len(self._pending) + 256:
            self._timers = [t for t in self._timers if t[2].reply is None]
            heapq.heapify(self._timers)

    async def _timer(self) -> None:
        timers = self._timers
        while True:
            with trio.CancelScope() as scope:
                self._timer_scope = scope
                timers = self._timers
                scope.deadline = timers[0][0] if timers else math.inf
                await trio.sleep_forever()
            now = trio.current_time()
            timers = self._timers
            while timers and timers[0][0] <= now:
                waiter = heapq.heappop(timers)[2]
                if waiter.reply is None and not waiter.event.is_set():
                    waiter.timed_out = True
                    waiter.event.set()

    # -- writing -----------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._out:
            self._out += data
            return
        sent = self._transport.try_send(data)
        if sent != len(data):
            self._out += data[sent:]
            self._out_event.set()

    async def _wait_fd_slot(self, command: str) -> None:
        """Wait until the write queue is empty and the socket writable (fds ride on the
        first byte of their message, so nothing may be queued before it)."""
        if not self._transport.can_pass_fds:
            raise UsageError(
                f"cannot pass a file descriptor with {command!r} over {self.address}",
                hint="fd passing needs a unix socket connection",
            )
        while True:
            await self._wait_drained(command)
            await self._transport.wait_writable()
            if self._error is not None:
                raise self._gone(command)
            if not self._out:
                return

    def _write_with_fds(self, data: bytes, fds: list[int]) -> None:
        try:
            sent = self._transport.try_send_fds(data, fds)
        except BlockingIOError:
            sent = 0
        if sent == 0:
            raise DisconnectedError(
                f"could not pass fds to {self.address}: the socket took no data",
                hint="retry; the server is not reading",
            )
        if sent != len(data):
            self._out += data[sent:]
            self._out_event.set()

    async def _before_send(
        self, command: str, oob: bool, fds: list[int] | None, timeout: float
    ) -> None:
        """Wait until ``command`` may be written: the write queue below its high-water
        mark, a free slot in the in-band window, the socket ready for fds."""
        with trio.move_on_after(timeout):
            if self._out and len(self._out) > _HIGH_WATER:
                await self._wait_drained(command)
            if not oob and self._proto.oob_enabled:
                await self._wait_window(command)
            if fds is not None:
                await self._wait_fd_slot(command)
            return
        raise QMPTimeoutError(
            f"could not send {command!r} to {self.address} within {timeout:g} s: "
            f"{self._proto.in_band_in_flight} in-band commands still in flight, "
            f"{len(self._out)} bytes not yet written",
            hint="the server is busy or stuck; earlier commands that timed out may still run",
        )

    async def _wait_window(self, command: str) -> None:
        while self._error is None and self._proto.in_band_in_flight >= IN_BAND_WINDOW:
            await self._window.park()
        if self._error is not None:
            raise self._gone(command)

    async def _wait_drained(self, command: str) -> None:
        while self._out and self._error is None:
            if self._drained is None:
                self._drained = trio.Event()
            await self._drained.wait()
        if self._error is not None:
            raise self._gone(command)

    async def _writer(self) -> None:
        try:
            while self._error is None:
                await self._out_event.wait()
                self._out_event = trio.Event()
                while self._out and self._error is None:
                    sent = await self._transport.send_some(bytes(self._out))
                    del self._out[:sent]
                if self._drained is not None:
                    self._drained.set()
                    self._drained = None
        except Exception as exc:
            self._fail(exc)

    # -- reading -----------------------------------------------------------------------

    async def _reader(self) -> None:
        proto = self._proto
        receive = self._transport.receive
        pending = self._pending
        try:
            while True:
                data = await receive()
                for item in proto.receive_data(data):
                    if type(item) is ReplyItem:
                        waiter = pending.pop(item.id, None)
                        if waiter is not None:
                            waiter.reply = item.message
                            waiter.event.set()
                    elif type(item) is EventItem:
                        for listener in self._dispatch_event(item.message):
                            await listener.put(item.message)  # overflow="block"
                    else:
                        self._handle(item)
                if self._window:
                    free = IN_BAND_WINDOW - proto.in_band_in_flight
                    if free > 0:
                        self._window.unpark(count=free)
                if not data:
                    raise DisconnectedError(f"{self.address} closed the QMP connection")
        except Exception as exc:
            self._fail(exc)

    def _dispatch_event(self, message: Message) -> list[EventListener]:
        """Give ``message`` to every listener that wants it; return the full listeners
        whose policy is to block the reader until they have room."""
        name = message.get("event")
        if not isinstance(name, str):
            if self._warn_limit.allows("nameless event"):
                logger.warning("%s: event without a name dropped: %r", self.address, message)
            return []
        return [
            listener
            for listener in list(self._listeners)
            if listener.wants(name, message) and not listener.push(message)
        ]

    def _handle(self, item: object) -> None:
        if isinstance(item, GreetingItem):
            self.greeting_message = item.message
            if self._proto.negotiate:
                self._write(self._proto.start_negotiation())
            else:
                self._ready.set()
        elif isinstance(item, NegotiatedItem):
            self._ready.set()
        elif isinstance(item, DroppedReply):
            if item.reason != "abandoned" and self._warn_limit.allows("dropped reply"):
                logger.warning(
                    "%s: reply dropped (%s): %r%s",
                    self.address,
                    item.reason,
                    item.message,
                    self._warn_limit.suffix("dropped reply"),
                )
        elif isinstance(item, ClosedItem) and item.partial:
            logger.warning("%s: connection closed in the middle of a message", self.address)

    def _fail(self, exc: BaseException) -> None:
        """The connection is unusable from now on: wake everyone."""
        if self._error is None:
            if not isinstance(exc, QMPError):
                wrapped = DisconnectedError(f"connection to {self.address} failed: {exc!r}")
                wrapped.__cause__ = exc
                exc = wrapped
            self._error = exc
            if not self._closing:
                logger.debug("%s: connection failed: %s", self.address, exc)
        self._proto.close()
        pending = list(self._pending.values())
        self._pending.clear()
        for waiter in pending:
            waiter.event.set()
        for listener in self._listeners:
            listener.end(None if self._closing else self._error)
        self._ready.set()
        self._window.unpark_all()
        self._out_event.set()
        if self._drained is not None:
            self._drained.set()
            self._drained = None

    def _gone(self, what: str) -> DisconnectedError:
        cause = self._error
        if self._closing and isinstance(cause, DisconnectedError):
            exc = DisconnectedError(f"{what}: the QMP connection to {self.address} is closed")
        else:
            exc = DisconnectedError(
                f"{what}: lost the QMP connection to {self.address}: {cause}",
                hint="the command may or may not have run; if QEMU still runs, reconnect "
                "and ask it",
            )
        exc.__cause__ = cause
        return exc

    # -- life cycle --------------------------------------------------------------------

    async def _handshake(self) -> None:
        await self._ready.wait()
        if self._error is not None:
            raise self._error

    async def _run_tasks(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with self._cancel_tasks:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader)
                nursery.start_soon(self._writer)
                nursery.start_soon(self._timer)
                task_status.started()

    async def aclose(self) -> None:
        """Close the connection; calls in flight fail with DisconnectedError.  Idempotent."""
        if not self._closing:
            self._closing = True
            self._fail(DisconnectedError("closed by this client"))
            with trio.CancelScope(shield=True):
                await self._transport.aclose()
            self._cancel_tasks.cancel()
        await trio.lowlevel.checkpoint()


@asynccontextmanager
async def open_qmp(
    address: Address,
    *,
    connect_timeout: float = 5.0,
    negotiate: bool = True,
    validate: bool = False,
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
    max_message_size: int = MAX_MESSAGE_SIZE,
    ids: bool = False,
) -> AsyncIterator[QMPClient]:
    """Connect to a QMP server and yield a ready :class:`QMPClient`; close it on exit.

    ``address``: a unix socket path (str or Path), a ``(host, port)`` pair, an already
    connected ``socket.socket`` (the client takes ownership and closes it), or a
    ``trio.abc.Stream``.  ``connect_timeout`` covers connecting, the greeting and the
    negotiation (``negotiate=False`` skips ``qmp_capabilities``).  ``validate`` loads
    the live schema and checks each command against it before sending.
    ``command_timeout`` is the default timeout of ``execute``.  ``ids=True`` puts an id
    on every command; by default only out-of-band commands carry one and in-band replies
    are matched in issue order, as the QMP spec guarantees (QEMU answers faster without
    ids; see :mod:`kvmkit.qmp.protocol`).
    """
    check_timeout(connect_timeout, "connect_timeout")
    check_timeout(command_timeout, "command_timeout")
    body_error: BaseException | None = None
    try:
        with trio.fail_after(connect_timeout):
            transport = await connect(address)
    except trio.TooSlowError:
        raise ConnectError(
            f"cannot connect to QMP at {address!r}: no connection within {connect_timeout:g} s"
        ) from None
    client = QMPClient(
        transport,
        negotiate=negotiate,
        max_message_size=max_message_size,
        command_timeout=command_timeout,
        ids=ids,
    )
    async with trio.open_nursery() as nursery:
        # Errors stay out of the nursery, so callers see them bare, not in an ExceptionGroup.
        try:
            await nursery.start(client._run_tasks)
            try:
                with trio.fail_after(connect_timeout):
                    await client._handshake()
            except trio.TooSlowError:
                raise ConnectError(
                    f"no QMP greeting and negotiation from {client.address} within "
                    f"{connect_timeout:g} s",
                    hint="QEMU serves one QMP client per socket: is another one connected?",
                ) from None
            except (QMPProtocolError, DisconnectedError) as exc:
                raise ConnectError(
                    f"QMP handshake with {client.address} failed", exc, hint=exc.hint
                ) from exc
            if validate:
                await client.load_schema()
            yield client
        except BaseException as exc:
            body_error = exc
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()
    if body_error is not None:
        try:
            raise body_error
        finally:
            body_error = None
