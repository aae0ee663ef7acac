"""Plain-socket transports for migration: ``tcp:HOST:PORT`` and ``unix:PATH``, every
blocking call bounded by a timeout."""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass

from kvmkit.runner.migration.errors import TransportError


@dataclass(frozen=True)
class Address:
    """A parsed ``tcp:HOST:PORT`` or ``unix:PATH`` migration address."""

    family: socket.AddressFamily
    target: str | tuple[str, int]

    def __str__(self) -> str:
        if self.family == socket.AF_UNIX:
            return f"unix:{self.target}"
        assert isinstance(self.target, tuple)
        host, port = self.target
        return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


def parse_address(text: str) -> Address:
    """``tcp:HOST:PORT`` (IPv6 as ``tcp:[::1]:PORT``) or ``unix:PATH``."""
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise TransportError(
            f"bad migration address {text!r}", hint="use tcp:HOST:PORT or unix:PATH"
        )
    if kind == "unix":
        return Address(socket.AF_UNIX, rest)
    if kind == "tcp":
        host, sep, port = rest.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise TransportError(f"bad migration address {text!r}", hint="use tcp:HOST:PORT")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return Address(family, (host, int(port)))
    raise TransportError(
        f"unknown migration transport {kind!r} in {text!r}", hint="use tcp: or unix:"
    )


def connect(address: str | Address, *, timeout: float = 10.0) -> socket.socket:
    """Connect to a listening destination; every later send/recv has ``timeout``."""
    addr = parse_address(address) if isinstance(address, str) else address
    sock = socket.socket(addr.family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(addr.target)
    except OSError as exc:
        sock.close()
        raise TransportError(
            f"cannot connect to {addr}: {exc}", hint="is the destination listening?"
        ) from None
    return sock


def listen(address: str | Address) -> socket.socket:
    """A listening socket.  For ``unix:PATH`` a stale socket file is replaced, any other
    existing file is an error."""
    addr = parse_address(address) if isinstance(address, str) else address
    sock = socket.socket(addr.family, socket.SOCK_STREAM)
    try:
        if addr.family == socket.AF_UNIX:
            path = str(addr.target)
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
            except FileNotFoundError:
                pass
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr.target)
        sock.listen(1)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot listen on {addr}: {exc}") from None
    return sock


def accept(listener: socket.socket, *, timeout: float = 60.0) -> socket.socket:
    """Wait up to ``timeout`` s for the source; the connection gets the same timeout."""
    listener.settimeout(timeout)
    try:
        conn, _ = listener.accept()
    except TimeoutError:
        raise TransportError(f"no source connected within {timeout:g} s") from None
    except OSError as exc:
        raise TransportError(f"accept failed: {exc}") from None
    conn.settimeout(timeout)
    return conn
