"""Byte transports under the trio QMP client: a non-blocking socket, or any trio Stream.

A transport offers ``try_send`` (write what fits right now, without waiting),
``send_some`` (wait until something can be written, write it), ``receive`` (wait for
bytes; ``b""`` at end of stream) and ``aclose``.  The socket transport also passes file
descriptors (``SCM_RIGHTS``).  Transports are used by one reader task and one writer at a
time; the client guarantees that.
"""

from __future__ import annotations

import array
import os
import socket
from pathlib import Path

import trio

from kvmkit.qmp.errors import ConnectError, DisconnectedError, UsageError

RECV_SIZE = 64 * 1024

Address = str | os.PathLike[str] | tuple[str, int] | socket.socket | trio.abc.Stream


class SocketTransport:
    """A connected stream socket driven without trio.SocketStream's per-call overhead."""

    def __init__(self, sock: socket.socket, description: str) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.description = description
        self.can_pass_fds = sock.family == socket.AF_UNIX
        self._closed = False

    def try_send(self, data: bytes) -> int:
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise DisconnectedError(f"writing to {self.description} failed: {exc}") from exc

    async def send_some(self, data: bytes | bytearray | memoryview) -> int:
        while True:
            await trio.lowlevel.wait_writable(self.sock)
            try:
                return self.sock.send(data)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise DisconnectedError(f"writing to {self.description} failed: {exc}") from exc

    def try_send_fds(self, data: bytes, fds: list[int]) -> int:
        """Send ``data`` with ``fds`` attached to its first byte; raises BlockingIOError."""
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            return self.sock.sendmsg([data], ancillary)
        except BlockingIOError:
            raise
        except OSError as exc:
            raise DisconnectedError(f"passing fds to {self.description} failed: {exc}") from exc

    async def wait_writable(self) -> None:
        await trio.lowlevel.wait_writable(self.sock)

    async def receive(self) -> bytes:
        # Wait first: the reader calls this right after handling a message, when the
        # socket is most likely empty, and a failed recv() costs more than the wait.
        sock = self.sock
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                return sock.recv(RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise DisconnectedError(f"reading from {self.description} failed: {exc}") from exc

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()
        await trio.lowlevel.checkpoint()


class StreamTransport:
    """Any trio byte stream (memory streams in tests, TLS, ...); cannot pass fds."""

    can_pass_fds = False

    def __init__(self, stream: trio.abc.Stream, description: str) -> None:
        self.stream = stream
        self.description = description

    def try_send(self, data: bytes) -> int:
        return 0

    async def send_some(self, data: bytes | bytearray | memoryview) -> int:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise DisconnectedError(f"writing to {self.description} failed: {exc}") from exc
        return len(data)

    def try_send_fds(self, data: bytes, fds: list[int]) -> int:
        raise UsageError(f"cannot pass file descriptors over {self.description}")

    async def wait_writable(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive(self) -> bytes:
        try:
            return bytes(await self.stream.receive_some(RECV_SIZE))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise DisconnectedError(f"reading from {self.description} failed: {exc}") from exc

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


Transport = SocketTransport | StreamTransport


def describe(address: Address) -> str:
    if isinstance(address, tuple):
        host, port = address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(address, socket.socket):
        return f"socket fd {address.fileno()}"
    if isinstance(address, trio.abc.Stream):
        return f"stream {type(address).__name__}"
    if isinstance(address, str | os.PathLike):
        return os.fspath(address)
    return repr(address)


async def connect(address: Address) -> Transport:
    """Connect to ``address``; raises ConnectError with the root cause chained."""
    text = describe(address)
    if isinstance(address, trio.abc.Stream):
        return StreamTransport(address, text)
    if isinstance(address, socket.socket):
        if address.type != socket.SOCK_STREAM:
            raise UsageError(f"{text} is not a stream socket; QMP needs SOCK_STREAM")
        return SocketTransport(address, text)
    if isinstance(address, tuple):
        if len(address) != 2 or not isinstance(address[1], int):
            raise UsageError(f"a TCP address is a (host, port) pair, not {address!r}")
        try:
            stream = await trio.open_tcp_stream(address[0], address[1])
        except OSError as exc:
            raise ConnectError(
                f"cannot connect to QMP at {text}", exc, hint="is QEMU listening there?"
            ) from exc
    elif isinstance(address, str | os.PathLike):
        path = Path(address)
        try:
            stream = await trio.open_unix_socket(os.fspath(path))
        except OSError as exc:
            hint = (
                "no such socket: is QEMU running with -qmp unix:PATH,server=on?"
                if not path.exists()  # noqa: ASYNC240 - one local stat on the error path
                else "is QEMU running and is this its QMP socket?"
            )
            raise ConnectError(f"cannot connect to QMP at {text}", exc, hint=hint) from exc
    else:
        raise UsageError(
            f"cannot use {address!r} as a QMP address",
            hint="give a unix socket path, a (host, port) pair, or a connected socket",
        )
    # Take the plain socket out of trio's wrapper: the client drives it directly.
    fd = stream.socket.detach()
    sock = socket.socket(fileno=fd)
    return SocketTransport(sock, text)
