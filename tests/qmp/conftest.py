"""Fixtures for the QMP client tests: a real paused QEMU, and a fake QMP server.

``qemu`` starts ``qemu-system-x86_64 -S -machine none`` in a fresh temp dir with two QMP
sockets (QEMU serves one client per socket) and always kills it by PID and removes the
dir.  ``FakeQMP`` plays the server side of a ``trio.testing.memory_stream_pair``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

GREETING = {
    "QMP": {
        "version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"},
        "capabilities": ["oob"],
    }
}


@dataclass
class Qemu:
    """A running QEMU: its process, temp dir and QMP socket paths."""

    proc: subprocess.Popen[bytes]
    dir: Path
    sockets: list[Path]
    tcp_port: int | None = None
    log: Path = field(default_factory=Path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def socket(self) -> Path:
        return self.sockets[0]

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def qemu_factory(qemu_binary: str) -> Iterator[Callable[..., Qemu]]:
    """Start paused QEMUs; every one is killed and its dir removed at teardown."""
    started: list[Qemu] = []

    def start(
        *, sockets: int = 2, tcp: bool = False, extra: list[str] | None = None, **popen: Any
    ) -> Qemu:
        tmp = Path(tempfile.mkdtemp(prefix="kvmkit-qmp-"))
        paths = [tmp / f"qmp{i}.sock" for i in range(sockets)]
        args = [qemu_binary, "-S", "-display", "none", "-nodefaults", "-machine", "none"]
        args += ["-accel", "tcg"]
        for path in paths:
            args += ["-qmp", f"unix:{path},server=on,wait=off"]
        port = None
        if tcp:
            port = _free_tcp_port()
            args += ["-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off"]
        args += extra or []
        log = tmp / "qemu.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, **popen
            )
        qemu = Qemu(proc, tmp, paths, port, log)
        started.append(qemu)
        deadline = time.monotonic() + 15
        while not all(p.exists() for p in paths):
            if proc.poll() is not None:
                pytest.fail(f"QEMU exited with {proc.returncode}: {qemu.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"QEMU created no QMP socket within 15 s: {qemu.log_tail()}")
            time.sleep(0.01)
        return qemu

    try:
        yield start
    finally:
        for qemu in started:
            try:
                qemu.kill()
            finally:
                shutil.rmtree(qemu.dir, ignore_errors=True)


@pytest.fixture
def qemu(qemu_factory: Callable[..., Qemu]) -> Qemu:
    return qemu_factory()


class FakeQMP:
    """The server end of a memory stream pair, speaking QMP line by line."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buf = b""

    @staticmethod
    def id_of(request: dict[str, Any]) -> dict[str, Any]:
        """The id member for the reply to ``request``: echoed if it had one, as QEMU does."""
        return {"id": request["id"]} if "id" in request else {}

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send(self, obj: dict[str, Any]) -> None:
        await self.stream.send_all(json.dumps(obj).encode() + b"\r\n")

    async def recv(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError("client closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        obj = json.loads(line)
        assert isinstance(obj, dict)
        return obj

    async def greet(self, capabilities: tuple[str, ...] = ("oob",)) -> dict[str, Any]:
        greeting = json.loads(json.dumps(GREETING))
        greeting["QMP"]["capabilities"] = list(capabilities)
        await self.send(greeting)
        request = await self.recv()
        assert request["execute"] == "qmp_capabilities"
        await self.send({"return": {}, **self.id_of(request)})
        return request

    async def serve_echo(self) -> None:
        """Answer every command with its own name and arguments, until EOF."""
        while True:
            try:
                request = await self.recv()
            except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
                return
            reply = {"command": request.get("execute"), "args": request.get("arguments")}
            await self.send({"return": reply, **self.id_of(request)})

    async def aclose(self) -> None:
        await self.stream.aclose()


@pytest.fixture
def fake_pair() -> tuple[trio.abc.Stream, FakeQMP]:
    client_end, server_end = trio.testing.memory_stream_pair()
    return client_end, FakeQMP(server_end)
