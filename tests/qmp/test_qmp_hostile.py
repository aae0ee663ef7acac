"""Hostile input, tried by machines: the sans-io protocol core fed arbitrary byte streams
split anywhere (Hypothesis), and what a server can make the client do — a burst of
events, endless dropped replies, absurd timeouts."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import pytest
import trio
import trio.lowlevel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmkit.qmp import open_qmp
from kvmkit.qmp.errors import QMPProtocolError, UsageError
from kvmkit.qmp.protocol import (
    DroppedReply,
    EventItem,
    GreetingItem,
    QMPProtocol,
    ReplyItem,
    State,
)

LIMIT = 256  # a small maximum message size, so bounds are reached quickly
GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                    "capabilities": []}}  # fmt: skip
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (taken modulo its length), in order."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def feed(proto: QMPProtocol, chunks: list[bytes]) -> tuple[list[Any], Exception | None]:
    """Feed every chunk (then EOF); return the items and the protocol error, if any.
    Between calls the buffered partial line never exceeds the maximum message size."""
    items: list[Any] = []
    try:
        for chunk in [*chunks, b""]:
            if chunk == b"" and proto.state is State.CLOSED:
                break
            items += proto.receive_data(chunk)
            assert proto._chunks_size <= proto.max_message_size
    except QMPProtocolError as exc:
        assert proto.state is State.CLOSED
        assert proto._chunks_size == 0
        return items, exc
    return items, None


@SETTINGS
@given(st.binary(max_size=2048), st.lists(st.integers(min_value=0), max_size=20))
def test_arbitrary_bytes_give_items_or_a_clear_error(data: bytes, cuts: list[int]) -> None:
    proto = QMPProtocol(negotiate=False, max_message_size=LIMIT)
    items, error = feed(proto, split(data, cuts))
    if error is not None:
        assert str(error)  # a message that says what was wrong
    for item in items:
        assert type(item).__name__ in {"GreetingItem", "EventItem", "DroppedReply", "ClosedItem"}


def _messages() -> st.SearchStrategy[list[dict[str, Any]]]:
    scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20))
    data = st.dictionaries(st.text(max_size=8), scalar, max_size=4)
    event = st.builds(
        lambda n, d: {"event": n, "data": d, "timestamp": {}}, st.text(max_size=12), data
    )
    reply = st.builds(lambda d: {"return": d, "id": 999_999}, data)  # an id never issued
    return st.lists(st.one_of(event, reply), max_size=20)


@SETTINGS
@given(_messages(), st.lists(st.integers(min_value=0), max_size=30), st.booleans())
def test_valid_streams_split_anywhere_give_the_same_messages(
    messages: list[dict[str, Any]], cuts: list[int], crlf: bool
) -> None:
    end = b"\r\n" if crlf else b"\n"
    wire = b"".join(json.dumps(m).encode() + end for m in [GREETING, *messages])
    whole, error = feed(QMPProtocol(negotiate=False), [wire])
    pieces, error2 = feed(QMPProtocol(negotiate=False), split(wire, cuts))
    assert error is None and error2 is None
    assert isinstance(whole[0], GreetingItem) and isinstance(pieces[0], GreetingItem)

    def payloads(items: list[Any]) -> list[Any]:
        out = []
        for item in items[1:]:
            if isinstance(item, EventItem):
                out.append(dict(item.message))
            elif isinstance(item, DroppedReply):
                out.append(item.message)
            else:
                assert not isinstance(item, ReplyItem)
        return out

    assert payloads(pieces) == payloads(whole) == messages


@SETTINGS
@given(
    st.integers(min_value=LIMIT + 1, max_value=8 * LIMIT), st.integers(min_value=1, max_value=64)
)
def test_a_line_longer_than_the_limit_is_refused_without_growing(size: int, step: int) -> None:
    proto = QMPProtocol(negotiate=False, max_message_size=LIMIT)
    data = b"{" + b" " * size
    _, error = feed(proto, [data[i : i + step] for i in range(0, len(data), step)])
    assert error is not None and "exceeds the maximum" in str(error)


# -- what a server can make the client do -------------------------------------------------


async def test_a_burst_of_events_is_not_dropped_with_back_pressure(
    fake_pair: Any, nursery: trio.Nursery
) -> None:
    """overflow='block' (what kvmkit qmp --events uses): a burst far larger than the
    buffer, read by a slow consumer, arrives whole and in order."""
    client_end, server = fake_pair
    burst = 500

    async def serve() -> None:
        await server.greet()
        wire = b"".join(
            json.dumps({"event": "E", "data": {"n": i}, "timestamp": {}}).encode() + b"\n"
            for i in range(burst)
        )
        await server.send_raw(wire)  # one write: the client reads it in big chunks

    nursery.start_soon(serve)
    async with open_qmp(client_end) as qmp, qmp.listen(buffer=4, overflow="block") as events:
        got = []
        for _ in range(burst):
            got.append((await events.get(10))["data"]["n"])
            await trio.lowlevel.checkpoint()  # a consumer slower than the reader
        assert got == list(range(burst))
        assert events.dropped == 0


async def test_dropped_reply_warnings_are_aggregated(
    fake_pair: Any, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    client_end, server = fake_pair
    flood = 2000

    async def serve() -> None:
        await server.greet()
        wire = b"".join(
            json.dumps({"return": {}, "id": 10_000 + i}).encode() + b"\n" for i in range(flood)
        )
        await server.send_raw(wire)
        request = await server.recv()
        await server.send({"return": {"ok": 1}, **server.id_of(request)})

    nursery.start_soon(serve)
    with caplog.at_level(logging.WARNING, logger="kvmkit.qmp"):
        async with open_qmp(client_end) as qmp:
            assert await qmp.execute("sync") == {"ok": 1}
            assert qmp.dropped_replies == flood
    dropped = [r for r in caplog.records if "reply dropped" in r.getMessage()]
    # the first three, then the 10th, 100th and 1000th: 6 lines for 2000 replies
    assert len(dropped) == 6, [r.getMessage()[:80] for r in dropped]
    assert "1000 so far" in dropped[-1].getMessage()


@pytest.mark.parametrize("bad", [-1.0, math.nan])
async def test_negative_or_nan_timeouts_are_refused(
    fake_pair: Any, nursery: trio.Nursery, bad: float
) -> None:
    client_end, server = fake_pair
    with pytest.raises(UsageError, match="connect_timeout must be"):
        async with open_qmp(client_end, connect_timeout=bad):
            pass
    nursery.start_soon(server.greet)
    async with open_qmp(client_end) as qmp:
        with pytest.raises(UsageError, match="timeout must be"):
            await qmp.execute("x", timeout=bad)
        with pytest.raises(UsageError, match="timeout must be"):
            await qmp.wait_event("X", timeout=bad)
        async with qmp.listen() as events:
            with pytest.raises(UsageError, match="timeout must be"):
                await events.get(bad)
