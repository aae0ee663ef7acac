"""The same command sequence through qemu.qmp's asyncio client and through kvmkit, against
the same QEMU (two QMP sockets), gives the same replies."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest
import trio
from qemu.qmp import ExecuteError as UpstreamExecuteError
from qemu.qmp import QMPClient as UpstreamClient

from kvmkit.qmp import ExecuteError, open_qmp

SEQUENCE: list[tuple[str, dict[str, Any] | None]] = [
    ("query-status", None),
    ("query-version", None),
    ("query-name", None),
    ("query-kvm", None),
    ("query-target", None),
    ("query-commands", None),
    ("query-machines", None),
    ("qom-list", {"path": "/machine"}),
    ("qom-get", {"path": "/machine", "property": "type"}),
    ("query-cpus-fast", None),
    ("cont", None),
    ("query-status", None),
    ("stop", None),
    ("query-status", None),
    ("human-monitor-command", {"command-line": "info status"}),
    ("no-such-command", None),
    ("qom-get", {"path": "/nowhere", "property": "type"}),
    ("query-status", {"unexpected": True}),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]}),
    ("query-migrate-capabilities", None),
    ("query-qmp-schema", None),
]


class AsyncioThread:
    """An asyncio event loop in a thread, for qemu.qmp's client."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return await trio.to_thread.run_sync(future.result, 30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def asyncio_thread() -> Iterator[AsyncioThread]:
    runner = AsyncioThread()
    try:
        yield runner
    finally:
        runner.close()


async def test_same_replies_as_qemu_qmp(qemu: Any, asyncio_thread: AsyncioThread) -> None:
    upstream = UpstreamClient("compare")

    async def upstream_call(command: str, arguments: dict[str, Any] | None) -> Any:
        try:
            return ("ok", await upstream.execute(command, arguments))
        except UpstreamExecuteError as exc:
            return ("error", exc.error_class, str(exc))

    await asyncio_thread.run(upstream.connect(str(qemu.sockets[1])))
    try:
        async with open_qmp(qemu.sockets[0]) as qmp:
            assert qmp.greeting is not None and upstream.greeting is not None
            assert qmp.greeting._raw == upstream.greeting._raw
            for command, arguments in SEQUENCE:
                try:
                    ours: Any = ("ok", await qmp.execute(command, arguments))
                except ExecuteError as exc:
                    ours = ("error", exc.error_class, str(exc))
                theirs = await asyncio_thread.run(upstream_call(command, arguments))
                assert ours == theirs, command
    finally:
        await asyncio_thread.run(upstream.disconnect())
