"""A blocking QMP client for scripts and notebooks: the trio client in a background thread.

::

    from kvmkit.qmp.sync import connect

    with connect("/run/vm/qmp.sock") as qmp:
        print(qmp.execute("query-status"))
        result, event = qmp.execute_and_wait("stop", event="STOP")
        with qmp.listen("RESUME") as events:
            qmp.execute("cont")
            print(events.get(timeout=5))

Each :class:`SyncQMPClient` owns one thread running ``trio.run``; calls are handed to it
with ``trio.from_thread`` and block the calling thread until done.  Calls may come from
several threads at once.  Do not call it from inside a trio run (use the async client
there).  The thread ends when the client is closed or the connection is lost; closing
is also done at interpreter exit if the caller forgot.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

import trio
from qemu.qmp import Message

from kvmkit.qmp.client import DEFAULT_EVENT_TIMEOUT, QMPClient, open_qmp
from kvmkit.qmp.errors import DisconnectedError, QMPTimeoutError, UsageError, check_timeout
from kvmkit.qmp.events import DEFAULT_BUFFER, EventListener, Overflow
from kvmkit.qmp.schema import Schema
from kvmkit.qmp.transport import Address

T = TypeVar("T")


class _Failure:
    """What a call raised in the client's thread, to be raised again in the caller's."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


# Extra seconds the calling thread waits beyond an operation's own timeout before it
# declares the background thread unresponsive.
_GRACE = 5.0


class SyncEventListener:
    """A blocking view of an :class:`~kvmkit.qmp.events.EventListener`."""

    def __init__(self, owner: SyncQMPClient, listener: EventListener) -> None:
        self._owner = owner
        self._listener = listener

    def get(self, timeout: float = DEFAULT_EVENT_TIMEOUT) -> Message:
        """The next event; QMPTimeoutError after ``timeout`` seconds."""
        try:
            return self._owner._run(self._listener.get, timeout, timeout=timeout)
        except StopAsyncIteration:
            raise DisconnectedError("the event listener was closed") from None

    def __iter__(self) -> Iterator[Message]:
        """Events until the listener or connection closes (waits without a time limit)."""
        while True:
            try:
                yield self._owner._run(self._listener.get, None, timeout=None)
            except StopAsyncIteration:
                return

    @property
    def dropped(self) -> int:
        return self._listener.dropped

    def __enter__(self) -> SyncEventListener:
        self._owner._run(self._listener.__aenter__)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._owner.closed:
            with contextlib.suppress(DisconnectedError):
                self._owner._run(self._listener.__aexit__, None, None, None)


class SyncQMPClient:
    """Blocking QMP client; see :func:`connect`."""

    def __init__(
        self,
        address: Address,
        *,
        connect_timeout: float = 5.0,
        negotiate: bool = True,
        validate: bool = False,
        **options: Any,
    ) -> None:
        if isinstance(address, trio.abc.Stream):
            raise UsageError("the synchronous client needs a socket address, not a trio stream")
        check_timeout(connect_timeout, "connect_timeout", allow_inf=False)
        self._ready: queue.Queue[BaseException | None] = queue.Queue()
        self._client: QMPClient | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._closed = False
        self._thread = threading.Thread(
            target=trio.run,
            args=(self._main, address, connect_timeout, negotiate, validate, options),
            name=f"kvmkit-qmp {address}",
            daemon=True,
        )
        self._thread.start()
        try:
            error = self._ready.get(timeout=connect_timeout + _GRACE)
        except queue.Empty:
            self._closed = True  # if the thread connects after all, it closes again
            raise QMPTimeoutError(
                f"the QMP thread did not start within {connect_timeout + _GRACE:g} s"
            ) from None
        if error is not None:
            self._thread.join(timeout=_GRACE)
            raise error

    async def _main(
        self,
        address: Address,
        connect_timeout: float,
        negotiate: bool,
        validate: bool,
        options: dict[str, Any],
    ) -> None:
        try:
            async with open_qmp(
                address,
                connect_timeout=connect_timeout,
                negotiate=negotiate,
                validate=validate,
                **options,
            ) as client:
                self._client = client
                self._token = trio.lowlevel.current_trio_token()
                self._stop = trio.Event()
                self._ready.put(None)
                if not self._closed:
                    await self._stop.wait()
        except BaseException as exc:  # handed to the caller's thread
            if self._client is None:
                self._ready.put(exc)
            else:
                raise

    @property
    def client(self) -> QMPClient:
        """The underlying async client (use only through this object's thread)."""
        assert self._client is not None
        return self._client

    @property
    def closed(self) -> bool:
        return self._closed or not self._thread.is_alive()

    @property
    def greeting(self) -> Any:
        return self.client.greeting

    def _run(self, fn: Callable[..., Awaitable[T]], *args: Any, timeout: float | None = None) -> T:
        check_timeout(timeout)
        if self.closed:
            raise DisconnectedError("the synchronous QMP client is closed")
        if self._thread is threading.current_thread():
            raise UsageError("do not call the synchronous QMP client from its own thread")
        result: queue.Queue[T | _Failure] = queue.Queue()

        async def call() -> None:
            try:
                result.put(await fn(*args))
            except BaseException as exc:
                result.put(_Failure(exc))

        try:
            trio.from_thread.run_sync(self._spawn, call, trio_token=self._token)
        except trio.RunFinishedError:
            raise DisconnectedError("the QMP connection's thread has ended") from None
        wait = None if timeout is None or timeout == math.inf else timeout + _GRACE
        try:
            outcome = result.get(timeout=wait)
        except queue.Empty:
            self._closed = True  # if the thread connects after all, it closes again
            raise QMPTimeoutError(f"the QMP thread did not answer within {wait:g} s") from None
        if not isinstance(outcome, _Failure):
            return outcome
        if isinstance(outcome.exc, trio.Cancelled):
            raise DisconnectedError("the synchronous QMP client was closed during the call")
        raise outcome.exc

    def _spawn(self, call: Callable[[], Awaitable[None]]) -> None:
        trio.lowlevel.spawn_system_task(call)

    def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        oob: bool = False,
    ) -> Any:
        """Run ``command``; same contract as :meth:`kvmkit.qmp.QMPClient.execute`."""
        wait = self.client.command_timeout if timeout is None else timeout
        return self._run(self._execute, command, arguments, timeout, oob, timeout=wait)

    async def _execute(self, command: str, arguments: Any, timeout: float | None, oob: bool) -> Any:
        return await self.client.execute(command, arguments, timeout=timeout, oob=oob)

    def wait_event(
        self,
        name: str,
        match: Mapping[str, Any] | None = None,
        timeout: float = DEFAULT_EVENT_TIMEOUT,
    ) -> Message:
        return self._run(self.client.wait_event, name, match, timeout, timeout=timeout)

    def execute_and_wait(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        event: str,
        match: Mapping[str, Any] | None = None,
        timeout: float = DEFAULT_EVENT_TIMEOUT,
    ) -> tuple[Any, Message]:
        async def call() -> tuple[Any, Message]:
            return await self.client.execute_and_wait(
                command, arguments, event=event, match=match, timeout=timeout
            )

        return self._run(call, timeout=timeout)

    def listen(
        self,
        *names: str,
        match: Mapping[str, Any] | None = None,
        buffer: int = DEFAULT_BUFFER,
        overflow: Overflow = "error",
    ) -> SyncEventListener:
        """A blocking listener; use as ``with qmp.listen("STOP") as events:``."""
        listener = self.client.listen(*names, match=match, buffer=buffer, overflow=overflow)
        return SyncEventListener(self, listener)

    def send_fd(self, fd: int, name: str, *, timeout: float | None = None) -> None:
        wait = self.client.command_timeout if timeout is None else timeout
        self._run(self.client.send_fd, fd, name, timeout=wait)

    def load_schema(self, *, validate: bool = True) -> Schema:
        async def call() -> Schema:
            return await self.client.load_schema(validate=validate)

        return self._run(call, timeout=self.client.command_timeout)

    def close(self) -> None:
        """Close the connection and end the thread.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        stop = self._stop
        if stop is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(stop.set, trio_token=self._token)
        self._thread.join(timeout=_GRACE + 5)

    def __enter__(self) -> SyncQMPClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()


def connect(
    address: Address,
    *,
    connect_timeout: float = 5.0,
    negotiate: bool = True,
    validate: bool = False,
    **options: Any,
) -> SyncQMPClient:
    """Connect and return a ready blocking client (also a context manager).

    Options are those of :func:`kvmkit.qmp.open_qmp`.
    """
    return SyncQMPClient(
        address,
        connect_timeout=connect_timeout,
        negotiate=negotiate,
        validate=validate,
        **options,
    )
