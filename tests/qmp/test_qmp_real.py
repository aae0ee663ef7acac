"""The trio client against a real paused qemu-system-x86_64."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from qemu import qmp as upstream

from kvmkit.errors import KvmkitError
from kvmkit.qmp import (
    ConnectError,
    DisconnectedError,
    ExecuteError,
    QMPError,
    SchemaError,
    open_qmp,
)


async def test_negotiation_and_query_status(qemu: Any) -> None:
    async with open_qmp(qemu.socket) as qmp:
        assert qmp.greeting is not None
        version: Any = qmp.greeting.QMP.version["qemu"]
        assert isinstance(version["major"], int) and version["major"] >= 2
        assert "oob" in qmp.greeting.QMP.capabilities
        assert qmp.oob_enabled
        assert qmp.greeting_message is not None and "QMP" in qmp.greeting_message
        status = await qmp.execute("query-status")
        assert status["status"] == "prelaunch"
        assert status["running"] is False
        # out-of-band execution works once negotiated
        yanks = await qmp.execute("query-yank")
        assert isinstance(yanks, list)
        assert await qmp.execute("query-yank", oob=True) == yanks
        info = await qmp.execute("query-version")
        assert info["qemu"] == version


async def test_without_negotiation_only_capabilities_work(qemu: Any) -> None:
    async with open_qmp(str(qemu.socket), negotiate=False) as qmp:
        with pytest.raises(ExecuteError) as info:
            await qmp.execute("query-status")
        assert info.value.error_class == "CommandNotFound"
        assert await qmp.execute("qmp_capabilities") == {}
        assert (await qmp.execute("query-status"))["status"] == "prelaunch"


async def test_stop_cont_and_their_events(qemu: Any) -> None:
    async with open_qmp(qemu.socket) as qmp:
        result, event = await qmp.execute_and_wait("cont", event="RESUME", timeout=10)
        assert result == {}
        assert event["event"] == "RESUME"
        timestamp: Any = event["timestamp"]
        assert set(timestamp) == {"seconds", "microseconds"}
        assert (await qmp.execute("query-status"))["running"] is True

        async with qmp.listen("STOP", "RESUME") as events:
            await qmp.execute("stop")
            await qmp.execute("cont")
            await qmp.execute("stop")
            names = [(await events.get(10))["event"] for _ in range(3)]
        assert names == ["STOP", "RESUME", "STOP"]
        assert (await qmp.execute("query-status"))["status"] == "paused"

        async with trio.open_nursery() as nursery:
            got: list[Any] = []

            async def waiter() -> None:
                got.append(await qmp.wait_event("RESUME", timeout=10))

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            await qmp.execute("cont")
        assert got[0]["event"] == "RESUME"


async def test_error_reply_raises_execute_error_with_class(qemu: Any) -> None:
    async with open_qmp(qemu.socket) as qmp:
        with pytest.raises(ExecuteError) as info:
            await qmp.execute("no-such-command")
        assert isinstance(info.value, upstream.ExecuteError)
        assert info.value.error_class == "CommandNotFound"
        assert "no-such-command" in str(info.value)
        assert info.value.sent["execute"] == "no-such-command"
        assert "error" in info.value.received

        with pytest.raises(ExecuteError) as info:
            await qmp.execute("qom-get", {"path": "/nowhere", "property": "type"})
        assert info.value.error_class == "DeviceNotFound"

        with pytest.raises(ExecuteError) as info:
            await qmp.execute("query-status", {"bogus": 1})
        assert info.value.error_class == "GenericError"
        # the connection still works after errors
        assert (await qmp.execute("query-status"))["status"] == "prelaunch"


async def test_schema_validation(qemu: Any) -> None:
    async with open_qmp(qemu.socket) as qmp:
        schema = await qmp.load_schema()
        assert "query-status" in schema.commands
        assert schema.arguments_of("qom-get") == {"path": True, "property": True}
        # a typo is caught before sending, with suggestions and the valid names
        with pytest.raises(SchemaError, match="did you mean .*query-status") as info:
            await qmp.execute("query-statsu")
        assert "valid commands:" in str(info.value) and "qom-list" in str(info.value)
        assert isinstance(info.value, KvmkitError) and isinstance(info.value, upstream.QMPError)
        with pytest.raises(SchemaError, match=r"qom-get: unknown argument 'pth'.*path, property"):
            await qmp.execute("qom-get", {"pth": "/machine", "property": "type"})
        with pytest.raises(SchemaError, match="missing required argument 'property'"):
            await qmp.execute("qom-get", {"path": "/machine"})
        with pytest.raises(SchemaError, match=r"qom-get.path: expected a string, got an integer"):
            await qmp.execute("qom-get", {"path": 5, "property": "type"})
        with pytest.raises(SchemaError, match=r"capability: expected one of .*'events'"):
            await qmp.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "not-a-cap", "state": True}]})  # fmt: skip
        with pytest.raises(SchemaError, match=r"expected a boolean"):
            await qmp.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "events", "state": "yes"}]})  # fmt: skip
        # union branches: members of the chosen branch are allowed, others are not
        with pytest.raises(SchemaError, match="blockdev-add: unknown argument 'size'"):
            await qmp.execute(
                "blockdev-add", {"driver": "file", "node-name": "n", "filename": "/x", "size": 1}
            )
        with pytest.raises(SchemaError, match="cannot run out of band.*query-yank"):
            await qmp.execute("query-status", oob=True)
        # valid calls pass through to QEMU
        assert await qmp.execute("qom-get", {"path": "/machine", "property": "type"})
        result = await qmp.execute(
            "migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]}
        )
        assert result == {}

    async with open_qmp(qemu.socket, validate=True) as qmp:
        assert qmp.schema is not None
        with pytest.raises(SchemaError):
            await qmp.execute("query-statsu")


async def test_send_fd_and_add_fd(qemu: Any) -> None:
    async with open_qmp(qemu.socket) as qmp:
        assert qmp.can_pass_fds
        read_end, write_end = os.pipe()
        try:
            await qmp.send_fd(write_end, "kvmkit-pipe")
            assert await qmp.execute("closefd", {"fdname": "kvmkit-pipe"}) == {}
            with pytest.raises(ExecuteError, match="kvmkit-pipe"):
                await qmp.execute("closefd", {"fdname": "kvmkit-pipe"})
            info = await qmp.add_fd(read_end, opaque="kvmkit-test")
            fdsets = await qmp.execute("query-fdsets")
            mine = [s for s in fdsets if s["fdset-id"] == info["fdset-id"]]
            assert mine[0]["fds"] == [{"fd": info["fd"], "opaque": "kvmkit-test"}]
        finally:
            os.close(read_end)
            os.close(write_end)


@pytest.mark.parametrize("ids", [False, True], ids=["in-order", "ids"])
async def test_1000_concurrent_calls_each_get_their_reply(qemu: Any, ids: bool) -> None:
    results: dict[int, Any] = {}
    async with open_qmp(qemu.socket, ids=ids) as qmp:

        async def call(i: int) -> None:
            if i % 2:
                line = {"command-line": f"print {i}"}
                results[i] = await qmp.execute("human-monitor-command", line)
            else:
                try:
                    await qmp.execute("qom-get", {"path": f"/no-{i}", "property": "type"})
                except ExecuteError as exc:
                    results[i] = exc

        async with trio.open_nursery() as nursery:
            for i in range(1000):
                nursery.start_soon(call, i)
        assert qmp.in_flight == 0
    assert len(results) == 1000
    for i, result in results.items():
        if i % 2:
            assert result.strip() == hex(i)
        else:
            assert isinstance(result, ExecuteError)
            assert f"/no-{i}'" in str(result)


async def test_qemu_killed_mid_command(qemu: Any) -> None:
    async with open_qmp(qemu.socket) as qmp:
        outcome: list[BaseException] = []

        async def call() -> None:
            try:
                await qmp.execute("query-status", timeout=30)
            except QMPError as exc:
                outcome.append(exc)

        async with qmp.listen() as events, trio.open_nursery() as nursery:
            os.kill(qemu.pid, signal.SIGSTOP)  # QEMU stops reading: the call stays in flight
            nursery.start_soon(call)
            nursery.start_soon(call)
            await trio.testing.wait_all_tasks_blocked()
            assert qmp.in_flight == 2
            qemu.kill()
        assert len(outcome) == 2
        assert all(isinstance(e, DisconnectedError) for e in outcome)
        assert "may or may not have run" in str(outcome[0])
        with pytest.raises(DisconnectedError):
            await events.get(timeout=5)
        with pytest.raises(DisconnectedError):
            await qmp.execute("query-status")
        assert qmp.closed


async def test_cancelling_a_caller_keeps_the_stream_intact(qemu: Any) -> None:
    async with open_qmp(qemu.socket) as qmp:
        results: list[Any] = []

        async def call(i: int) -> None:
            results.append((i, await qmp.execute("human-monitor-command", {
                "command-line": f"print {i}"})))  # fmt: skip

        os.kill(qemu.pid, signal.SIGSTOP)
        try:
            async with trio.open_nursery() as nursery:
                with trio.CancelScope() as doomed:
                    async with trio.open_nursery() as inner:
                        for i in range(0, 50, 2):
                            inner.start_soon(call, i)
                        await trio.testing.wait_all_tasks_blocked()
                        for i in range(1, 50, 2):
                            nursery.start_soon(call, i)
                        await trio.testing.wait_all_tasks_blocked()
                        doomed.cancel()
                os.kill(qemu.pid, signal.SIGCONT)
        finally:
            os.kill(qemu.pid, signal.SIGCONT)
        assert sorted(i for i, _ in results) == list(range(1, 50, 2))
        assert all(reply.strip() == hex(i) for i, reply in results)
        assert (await qmp.execute("query-status"))["status"] == "prelaunch"


async def test_tcp_and_socketpair_addresses(
    qemu_factory: Callable[..., Any], qemu_binary: str
) -> None:
    tcp_qemu = qemu_factory(sockets=1, tcp=True)
    with trio.fail_after(15):
        while True:  # the unix socket exists; the tcp listener is set up with it
            try:
                async with open_qmp(("127.0.0.1", tcp_qemu.tcp_port)) as qmp:
                    assert not qmp.can_pass_fds
                    assert (await qmp.execute("query-status"))["status"] == "prelaunch"
                break
            except ConnectError:
                await trio.sleep(0.05)

    ours, theirs = socket.socketpair()
    with ours:
        spare = qemu_factory(
            sockets=1,
            extra=["-chardev", f"socket,id=mon9,fd={theirs.fileno()}"]
            + ["-mon", "chardev=mon9,mode=control"],
            pass_fds=[theirs.fileno()],
        )
        theirs.close()
        async with open_qmp(ours) as qmp:
            assert qmp.can_pass_fds
            status = await qmp.execute("query-status")
            assert status["status"] == "prelaunch"
            pid = await qmp.execute("human-monitor-command", {"command-line": "info name"})
            assert isinstance(pid, str)
        assert spare.proc.poll() is None


async def test_connect_errors(qemu: Any, tmp_path: Any) -> None:
    with pytest.raises(ConnectError, match="no such socket") as info:
        async with open_qmp(tmp_path / "missing.sock"):
            pass
    assert isinstance(info.value, upstream.ConnectError)
    assert isinstance(info.value.__cause__, OSError)
    async with open_qmp(qemu.socket):
        # QEMU serves one client per socket: a second one gets no greeting
        with pytest.raises(ConnectError, match="is another one connected"):
            async with open_qmp(qemu.socket, connect_timeout=0.5):
                pass


def test_fixture_kills_qemu(qemu_factory: Callable[..., Any]) -> None:
    started = qemu_factory(sockets=1)
    assert started.proc.poll() is None
    started.kill()
    assert started.proc.returncode == -signal.SIGKILL
