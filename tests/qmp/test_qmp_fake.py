"""The trio client against a fake QMP server over memory streams: what QEMU won't do."""

from __future__ import annotations

import json
from typing import Any

import pytest
import qemu.qmp
import trio
import trio.lowlevel
import trio.testing

from kvmkit.qmp import (
    ConnectError,
    DisconnectedError,
    EventOverflowError,
    ExecuteError,
    MessageTooLargeError,
    QMPError,
    QMPProtocolError,
    QMPTimeoutError,
    UsageError,
    open_qmp,
)


async def test_greeting_and_negotiation_enable_oob(fake_pair: Any, nursery: trio.Nursery) -> None:
    client_end, server = fake_pair
    requests: list[dict[str, Any]] = []

    async def serve() -> None:
        requests.append(await server.greet())
        await server.serve_echo()

    nursery.start_soon(serve)
    async with open_qmp(client_end) as qmp:
        assert qmp.greeting is not None
        version: Any = qmp.greeting.QMP.version["qemu"]
        assert version["minor"] == 2
        assert qmp.oob_enabled
        assert await qmp.execute("x", {"a": [1, 2]}) == {"command": "x", "args": {"a": [1, 2]}}
    assert requests[0]["arguments"] == {"enable": ["oob"]}


async def test_no_oob_offered_means_no_oob(fake_pair: Any, nursery: trio.Nursery) -> None:
    client_end, server = fake_pair
    requests: list[dict[str, Any]] = []

    async def serve() -> None:
        requests.append(await server.greet(capabilities=()))
        await server.serve_echo()

    nursery.start_soon(serve)
    async with open_qmp(client_end) as qmp:
        assert not qmp.oob_enabled
        with pytest.raises(UsageError, match="out of band"):
            await qmp.execute("x", oob=True)
    assert requests[0]["arguments"] == {}


async def test_message_split_across_reads(fake_pair: Any, nursery: trio.Nursery) -> None:
    client_end, server = fake_pair

    async def serve() -> None:
        greeting = json.dumps({"QMP": {"version": {}, "capabilities": []}}).encode() + b"\n"
        for i in range(len(greeting)):  # one byte per write
            await server.send_raw(greeting[i : i + 1])
            await trio.lowlevel.checkpoint()
        request = await server.recv()
        await server.send({"return": {}, **server.id_of(request)})
        request = await server.recv()
        reply = (
            json.dumps({"return": {"big": "y" * 5000}, **server.id_of(request)}).encode() + b"\n"
        )
        for part in (reply[:7], reply[7:4000], reply[4000:-1], reply[-1:]):
            await server.send_raw(part)
            await trio.sleep(0.01)
        # Two replies and an event in one write.
        a, b = await server.recv(), await server.recv()
        both = (
            json.dumps({"return": 1, **server.id_of(a)})
            + "\n"
            + json.dumps({"event": "E", "data": {}, "timestamp": {}})
            + "\n"
            + json.dumps({"return": 2, **server.id_of(b)})
            + "\n"
        )
        await server.send_raw(both.encode())

    nursery.start_soon(serve)
    async with open_qmp(client_end) as qmp:
        assert await qmp.execute("big") == {"big": "y" * 5000}
        results: dict[str, Any] = {}

        async def call(name: str) -> None:
            results[name] = await qmp.execute(name)

        async with trio.open_nursery() as inner:
            inner.start_soon(call, "a")
            await trio.testing.wait_all_tasks_blocked()
            inner.start_soon(call, "b")
        assert results == {"a": 1, "b": 2}


@pytest.mark.parametrize("ids", [True, False], ids=["ids", "in-order"])
async def test_out_of_order_and_unknown_id_replies(
    fake_pair: Any, nursery: trio.Nursery, ids: bool
) -> None:
    """With ids=True any reply may come out of order; by default in-band commands carry no
    id and only out-of-band ones (which carry one) may overtake."""
    client_end, server = fake_pair

    async def serve() -> None:
        await server.greet()
        first, second, third = await server.recv(), await server.recv(), await server.recv()
        await server.send({"return": "unknown", "id": 99999})
        await server.send({"return": "unknown-str", "id": "__qmp#00001"})
        for request in (third, first, second):
            name = request.get("execute") or request["exec-oob"]
            await server.send({"return": name, **server.id_of(request), "extra": 1})

    nursery.start_soon(serve)
    async with open_qmp(client_end, ids=ids) as qmp:
        results: dict[str, Any] = {}

        async def call(name: str) -> None:
            results[name] = await qmp.execute(name, oob=name == "three" and not ids)

        async with trio.open_nursery() as inner:
            for name in ("one", "two", "three"):
                inner.start_soon(call, name)
                await trio.testing.wait_all_tasks_blocked()
        assert results == {"one": "one", "two": "two", "three": "three"}
        assert qmp.dropped_replies == 2


async def test_events_before_greeting_and_during_negotiation(
    fake_pair: Any, nursery: trio.Nursery
) -> None:
    client_end, server = fake_pair
    event = {"event": "EARLY", "data": {"n": 1}, "timestamp": {"seconds": 1, "microseconds": 2}}

    async def serve() -> None:
        await server.send(event)
        await server.send({"QMP": {"version": {}, "capabilities": []}})
        request = await server.recv()
        await server.send(event)
        await server.send({"return": {}, **server.id_of(request)})
        request = await server.recv()
        await server.send({"event": "LATE", "data": {"n": 2}, "timestamp": {}})
        await server.send({"return": "ok", **server.id_of(request)})

    nursery.start_soon(serve)
    async with open_qmp(client_end) as qmp, qmp.listen() as events:
        assert await qmp.execute("x") == "ok"
        late = await events.get(timeout=5)
        assert late["event"] == "LATE" and late["data"] == {"n": 2}
        assert isinstance(late, qemu.qmp.Message)


@pytest.mark.parametrize(
    "garbage",
    [b"{not json}\n", b"[1, 2]\n", b'"just a string"\n', b"\xff\xfe\n"],
    ids=["malformed", "array", "string", "not-utf8"],
)
async def test_malformed_message_fails_pending_calls(
    fake_pair: Any, nursery: trio.Nursery, garbage: bytes
) -> None:
    client_end, server = fake_pair

    async def serve() -> None:
        await server.greet()
        await server.recv()
        await server.send_raw(garbage)

    nursery.start_soon(serve)
    async with open_qmp(client_end) as qmp:
        with pytest.raises(DisconnectedError) as info:
            await qmp.execute("query-status")
        assert isinstance(info.value.__cause__, QMPProtocolError)
        assert isinstance(info.value.__cause__, qemu.qmp.error.ProtocolError)
        assert qmp.closed
        with pytest.raises(DisconnectedError):
            await qmp.execute("query-status")


async def test_malformed_greeting_is_a_connect_error(fake_pair: Any, nursery: trio.Nursery) -> None:
    client_end, server = fake_pair
    nursery.start_soon(server.send, {"QMP": {"version": {}}})  # no capabilities
    with pytest.raises(ConnectError, match="greeting is malformed") as info:
        async with open_qmp(client_end):
            pass
    assert isinstance(info.value, qemu.qmp.ConnectError)
    assert isinstance(info.value, QMPError) and isinstance(info.value, qemu.qmp.QMPError)


async def test_reply_before_greeting_is_a_connect_error(
    fake_pair: Any, nursery: trio.Nursery
) -> None:
    client_end, server = fake_pair
    nursery.start_soon(server.send, {"return": {}})
    with pytest.raises(ConnectError, match="expected the QMP greeting"):
        async with open_qmp(client_end):
            pass


async def test_negotiation_refused_is_a_connect_error(
    fake_pair: Any, nursery: trio.Nursery
) -> None:
    client_end, server = fake_pair

    async def serve() -> None:
        await server.send({"QMP": {"version": {}, "capabilities": []}})
        request = await server.recv()
        await server.send(
            {"error": {"class": "GenericError", "desc": "nope"}, **server.id_of(request)}
        )

    nursery.start_soon(serve)
    with pytest.raises(ConnectError, match="negotiation failed: nope"):
        async with open_qmp(client_end):
            pass


async def test_oversized_message(fake_pair: Any, nursery: trio.Nursery) -> None:
    client_end, server = fake_pair

    async def serve() -> None:
        await server.greet()
        request = await server.recv()
        start = json.dumps({"return": {"x": ""}, **server.id_of(request)})[:-3].encode()
        await server.send_raw(start)
        for _ in range(10):
            await server.send_raw(b"z" * 500)

    nursery.start_soon(serve)
    async with open_qmp(client_end, max_message_size=4096) as qmp:
        with pytest.raises(DisconnectedError) as info:
            await qmp.execute("query-status")
        assert isinstance(info.value.__cause__, MessageTooLargeError)
        assert "4096" in str(info.value.__cause__)


async def test_oversized_message_in_one_read(fake_pair: Any, nursery: trio.Nursery) -> None:
    client_end, server = fake_pair

    async def serve() -> None:
        await server.greet()
        request = await server.recv()
        await server.send({"return": "q" * 10000, **server.id_of(request)})

    nursery.start_soon(serve)
    async with open_qmp(client_end, max_message_size=4096) as qmp:
        with pytest.raises(DisconnectedError) as info:
            await qmp.execute("query-status")
        assert isinstance(info.value.__cause__, MessageTooLargeError)


async def test_server_never_answers_times_out(
    fake_pair: Any, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    client_end, server = fake_pair
    seen: list[dict[str, Any]] = []

    async def serve() -> None:
        await server.greet()
        seen.append(await server.recv())  # never answered in time
        request = await server.recv()
        await server.send({"return": "late", **server.id_of(seen[0])})  # late reply: dropped
        await server.send({"return": "second", **server.id_of(request)})

    nursery.start_soon(serve)
    async with open_qmp(client_end) as qmp:
        start = trio.current_time()
        with pytest.raises(QMPTimeoutError, match="no reply to 'slow'") as info:
            await qmp.execute("slow", timeout=7)
        assert trio.current_time() - start == pytest.approx(7)
        assert isinstance(info.value, TimeoutError)
        assert await qmp.execute("next") == "second"
        assert qmp.dropped_replies == 1
        # the default command timeout applies when none is given
        with pytest.raises(QMPTimeoutError):
            await qmp.execute("never")
        assert trio.current_time() - start == pytest.approx(7 + qmp.command_timeout)


async def test_server_never_greets(fake_pair: Any, autojump_clock: trio.testing.MockClock) -> None:
    client_end, _server = fake_pair
    with pytest.raises(ConnectError, match="no QMP greeting"):
        async with open_qmp(client_end, connect_timeout=3):
            pass
    assert trio.current_time() == pytest.approx(3)


async def test_wait_event_times_out(
    fake_pair: Any, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    client_end, server = fake_pair
    nursery.start_soon(server.greet)
    async with open_qmp(client_end) as qmp:
        with pytest.raises(QMPTimeoutError, match="no STOP matching"):
            await qmp.wait_event("STOP", match={"reason": "x"}, timeout=2)


async def test_server_closes_mid_reply(fake_pair: Any, nursery: trio.Nursery) -> None:
    client_end, server = fake_pair

    async def serve() -> None:
        await server.greet()
        a, b = await server.recv(), await server.recv()
        await server.send({"return": "first", **server.id_of(a)})
        await server.send_raw(json.dumps({"return": "second", **server.id_of(b)}).encode()[:10])
        await server.aclose()

    nursery.start_soon(serve)
    async with open_qmp(client_end) as qmp:
        results: dict[str, Any] = {}

        async def call(name: str) -> None:
            try:
                results[name] = await qmp.execute(name)
            except DisconnectedError as exc:
                results[name] = exc

        async with qmp.listen() as events, trio.open_nursery() as inner:
            inner.start_soon(call, "a")
            await trio.testing.wait_all_tasks_blocked()
            inner.start_soon(call, "b")
        assert results["a"] == "first"
        assert isinstance(results["b"], DisconnectedError)
        assert "closed the QMP connection" in str(results["b"])
        with pytest.raises(DisconnectedError):
            await events.get(timeout=1)


@pytest.mark.parametrize("ids", [True, False], ids=["ids", "in-order"])
async def test_error_reply_without_id_goes_to_oldest_in_band(
    fake_pair: Any, nursery: trio.Nursery, ids: bool
) -> None:
    client_end, server = fake_pair

    async def serve() -> None:
        await server.greet()
        _a, b = await server.recv(), await server.recv()
        await server.send({"error": {"class": "GenericError", "desc": "JSON parse error"}})
        await server.send({"return": "b", **server.id_of(b)})
        await server.send({"error": {"class": "GenericError", "desc": "stray"}})  # dropped

    nursery.start_soon(serve)
    async with open_qmp(client_end, ids=ids) as qmp:
        results: dict[str, Any] = {}

        async def call(name: str) -> None:
            try:
                results[name] = await qmp.execute(name)
            except ExecuteError as exc:
                results[name] = exc

        async with trio.open_nursery() as inner:
            inner.start_soon(call, "a")
            await trio.testing.wait_all_tasks_blocked()
            inner.start_soon(call, "b")
        assert isinstance(results["a"], ExecuteError)
        assert results["a"].error_class == "GenericError"
        assert str(results["a"]) == "JSON parse error"
        assert results["b"] == "b"
        await trio.testing.wait_all_tasks_blocked()
        assert qmp.dropped_replies == 1


async def test_bad_replies(fake_pair: Any, nursery: trio.Nursery) -> None:
    client_end, server = fake_pair

    async def serve() -> None:
        await server.greet()
        request = await server.recv()
        await server.send({**server.id_of(request), "neither": 1})
        request = await server.recv()
        await server.send({**server.id_of(request), "error": {"class": 3}})
        await server.serve_echo()

    nursery.start_soon(serve)
    async with open_qmp(client_end) as qmp:
        with pytest.raises(QMPProtocolError, match="neither 'return' nor 'error'"):
            await qmp.execute("a")
        with pytest.raises(QMPProtocolError, match="malformed error reply"):
            await qmp.execute("b")
        assert (await qmp.execute("c"))["command"] == "c"


async def test_cancelled_callers_do_not_disturb_others(
    fake_pair: Any, nursery: trio.Nursery
) -> None:
    client_end, server = fake_pair
    nursery.start_soon(server.greet)
    release = trio.Event()
    received: list[str] = []

    async def serve_late() -> None:
        await release.wait()
        while True:  # serve_echo, recording what reached the server
            try:
                request = await server.recv()
            except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
                return
            received.append(request["execute"])
            reply = {"command": request.get("execute"), "args": request.get("arguments")}
            await server.send({"return": reply, **server.id_of(request)})

    async with open_qmp(client_end) as qmp:
        nursery.start_soon(serve_late)
        results: dict[int, Any] = {}

        async def call(i: int) -> None:
            results[i] = await qmp.execute(f"c{i}", {"i": i})

        async with trio.open_nursery() as inner:
            scopes = []
            for i in range(40):
                scope = trio.CancelScope()
                scopes.append(scope)

                async def run(i: int = i, scope: trio.CancelScope = scope) -> None:
                    with scope:
                        await call(i)

                inner.start_soon(run)
            await trio.testing.wait_all_tasks_blocked()
            for scope in scopes[::2]:
                scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            release.set()
        assert sorted(results) == list(range(1, 40, 2))
        assert all(results[i] == {"command": f"c{i}", "args": {"i": i}} for i in results)
        assert (await qmp.execute("after"))["command"] == "after"
        # Cancelled commands that had already been written got their replies dropped
        # (which of them were written first depends on trio's scheduling order); the
        # cancelled ones still waiting to be written were never sent.
        sent_cancelled = [c for c in received if c.startswith("c") and int(c[1:]) % 2 == 0]
        assert qmp.dropped_replies == len(sent_cancelled)
        assert len(sent_cancelled) < 20


def device(event: Any) -> Any:
    return event["data"]["device"]


async def test_listener_filters_and_overflow(fake_pair: Any, nursery: trio.Nursery) -> None:
    client_end, server = fake_pair
    sent = trio.Event()

    async def serve() -> None:
        await server.greet()
        for i in range(10):
            data = {"device": f"d{i}", "path": {"bus": "pci" if i % 2 else "usb", "n": i}}
            await server.send({"event": "DEVICE_DELETED", "data": data, "timestamp": {}})
        await server.send({"event": "OTHER", "data": {}, "timestamp": {}})
        request = await server.recv()  # a sync point: all events were read before this
        await server.send({"return": {}, **server.id_of(request)})
        sent.set()

    nursery.start_soon(serve)
    async with (
        open_qmp(client_end) as qmp,
        qmp.listen("DEVICE_DELETED", match={"path": {"bus": "pci"}}) as pci,
        qmp.listen(buffer=3) as small,
        qmp.listen(buffer=3, overflow="drop-oldest") as recent,
        qmp.listen("OTHER", "DEVICE_DELETED", match={"device": "d4"}) as d4,
    ):
        await qmp.execute("sync")
        got = [device(await pci.get(1)) for _ in range(5)]
        assert got == ["d1", "d3", "d5", "d7", "d9"]
        assert pci.pending() == 0
        # "error" policy: the 3 buffered events, then the overflow is reported
        assert [device(await small.get(1)) for _ in range(3)] == [
            "d0",
            "d1",
            "d2",
        ]
        with pytest.raises(EventOverflowError, match="8 events were lost"):
            await small.get(1)
        # "drop-oldest" keeps the newest three
        names = [(await recent.get(1))["event"] for _ in range(3)]
        assert names == ["DEVICE_DELETED", "DEVICE_DELETED", "OTHER"]
        assert recent.dropped == 8
        assert device(await d4.get(1)) == "d4"
        assert d4.pending() == 0


async def test_unusable_address_and_state_errors(fake_pair: Any, nursery: trio.Nursery) -> None:
    with pytest.raises(UsageError, match="cannot use"):
        async with open_qmp(42):  # type: ignore[arg-type]
            pass
    client_end, server = fake_pair
    nursery.start_soon(server.greet)
    async with open_qmp(client_end) as qmp:
        with pytest.raises(UsageError, match="fd passing needs a unix socket"):
            await qmp.send_fd(0, "x")
        with pytest.raises(UsageError, match="cannot be encoded as JSON"):
            await qmp.execute("x", {"a": object()})
    with pytest.raises(DisconnectedError, match="is closed"):
        await qmp.execute("after-close")


async def test_body_errors_come_out_bare(fake_pair: Any, nursery: trio.Nursery) -> None:
    client_end, server = fake_pair
    nursery.start_soon(server.greet)
    with pytest.raises(KeyError):
        async with open_qmp(client_end):
            raise KeyError("mine")


async def test_in_band_window_lets_out_of_band_commands_through(
    fake_pair: Any, nursery: trio.Nursery
) -> None:
    client_end, server = fake_pair
    seen: list[dict[str, Any]] = []
    nursery.start_soon(server.greet)
    async with open_qmp(client_end) as qmp:
        assert qmp.oob_enabled

        async def call(name: str, oob: bool = False) -> None:
            await qmp.execute(name, oob=oob)

        async with trio.open_nursery() as inner:
            for i in range(20):
                inner.start_soon(call, f"in{i}")
            await trio.testing.wait_all_tasks_blocked()
            inner.start_soon(call, "urgent", True)
            while len(seen) < 9:
                seen.append(await server.recv())
            # 8 in-band commands, then the out-of-band one overtakes the 12 held back
            assert all(r["execute"].startswith("in") for r in seen[:8])
            assert seen[8]["exec-oob"] == "urgent" and "id" in seen[8]
            await server.send({"return": {}, "id": seen[8]["id"]})
            for _request in seen[:8]:
                await server.send({"return": {}})
            for _ in range(12):
                await server.send({"return": {}, **server.id_of(await server.recv())})
        assert qmp.in_flight == 0


async def test_full_in_band_window_times_out_before_sending(
    fake_pair: Any, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    client_end, server = fake_pair
    nursery.start_soon(server.greet)
    async with open_qmp(client_end) as qmp:

        async def stuck(i: int) -> None:
            with pytest.raises(QMPTimeoutError, match="no reply"):
                await qmp.execute(f"stuck{i}", timeout=5)

        async with trio.open_nursery() as inner:
            for i in range(8):
                inner.start_soon(stuck, i)
        # the server never answered: 8 in-band commands are still in flight for it
        start = trio.current_time()
        with pytest.raises(QMPTimeoutError, match="could not send 'next'.*8 in-band"):
            await qmp.execute("next", timeout=3)
        assert trio.current_time() - start == pytest.approx(3)
        # once the server answers the eight, commands flow again
        for _ in range(8):
            assert (await server.recv())["execute"].startswith("stuck")
        for _ in range(8):
            await server.send({"return": {}})
        nursery.start_soon(server.serve_echo)
        assert (await qmp.execute("after"))["command"] == "after"
        assert qmp.dropped_replies == 8
