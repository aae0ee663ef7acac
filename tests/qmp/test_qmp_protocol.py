"""The sans-I/O protocol core, driven by hand: bytes in, items out; commands in, bytes out."""

from __future__ import annotations

import json
from typing import Any

import pytest
from qemu.qmp import Message
from qemu.qmp.models import Greeting

from kvmkit.qmp import MessageTooLargeError, QMPProtocolError, UsageError
from kvmkit.qmp.protocol import (
    ClosedItem,
    DroppedReply,
    EventItem,
    GreetingItem,
    NegotiatedItem,
    QMPProtocol,
    ReplyItem,
    State,
)

GREETING = b'{"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": ["oob"]}}\r\n'


def line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\r\n"


def ready(**options: Any) -> QMPProtocol:
    proto = QMPProtocol(**options)
    items = proto.receive_data(GREETING)
    assert isinstance(items[0], GreetingItem) and isinstance(items[0].greeting, Greeting)
    request = json.loads(proto.start_negotiation())
    assert request["execute"] == "qmp_capabilities"
    assert request["arguments"] == {"enable": ["oob"]}
    (negotiated,) = proto.receive_data(line({"return": {}, "id": request["id"]}))
    assert negotiated == NegotiatedItem(("oob",))
    assert proto.state is State.READY and proto.oob_enabled
    return proto


def test_commands_without_ids_match_in_order() -> None:
    proto = ready()
    a, data_a = proto.send_command("query-status")
    b, data_b = proto.send_command("qom-get", {"path": "/machine", "property": "type"})
    assert json.loads(data_a) == {"execute": "query-status"}
    assert json.loads(data_b) == {
        "execute": "qom-get",
        "arguments": {"path": "/machine", "property": "type"},
    }
    assert data_a.endswith(b"\n") and data_a.count(b"\n") == 1
    assert proto.in_flight == 2 and proto.in_band_in_flight == 2
    items = proto.receive_data(line({"return": 1}) + line({"return": 2}))
    assert items == [ReplyItem(a, {"return": 1}), ReplyItem(b, {"return": 2})]
    assert proto.in_flight == 0 and proto.in_band_in_flight == 0


def test_ids_and_out_of_band() -> None:
    proto = ready(ids=True)
    a, data_a = proto.send_command("one")
    b, data_b = proto.send_command("two", oob=True)
    assert json.loads(data_a) == {"execute": "one", "id": a}
    assert json.loads(data_b) == {"exec-oob": "two", "id": b}
    assert proto.in_band_in_flight == 1
    items = proto.receive_data(line({"return": "b", "id": b}) + line({"return": "a", "id": a}))
    assert items == [ReplyItem(b, {"return": "b", "id": b}), ReplyItem(a, {"return": "a", "id": a})]


def test_framing_split_joined_and_blank_lines() -> None:
    proto = ready()
    a, _ = proto.send_command("x")
    b, _ = proto.send_command("y")
    data = b"\r\n" + line({"return": {"k": "v" * 100}}) + line({"return": 2})
    items: list[Any] = []
    for i in range(len(data)):
        items += proto.receive_data(data[i : i + 1])
    assert items == [ReplyItem(a, {"return": {"k": "v" * 100}}), ReplyItem(b, {"return": 2})]


def test_events_anywhere_and_extra_members() -> None:
    proto = QMPProtocol()
    event = {"event": "E", "data": {"a": 1}, "timestamp": {"seconds": 1, "microseconds": 0}}
    (item,) = proto.receive_data(line(event))
    assert isinstance(item, EventItem) and isinstance(item.message, Message)
    assert item.message["data"] == {"a": 1}
    assert proto.state is State.AWAITING_GREETING
    proto.receive_data(GREETING)
    proto.start_negotiation()
    (item,) = proto.receive_data(line(event))
    assert isinstance(item, EventItem)
    assert proto.state is State.NEGOTIATING


def test_unknown_abandoned_and_idless_replies() -> None:
    proto = ready(ids=True)
    a, _ = proto.send_command("a")
    b, _ = proto.send_command("b")
    proto.abandon(a)
    items = proto.receive_data(
        line({"return": 0, "id": 424242})
        + line({"return": 0, "id": [1]})
        + line({"return": "a", "id": a})
        + line({"error": {"class": "GenericError", "desc": "parse"}})
        + line({"return": "stray"})
    )
    assert items == [
        DroppedReply({"return": 0, "id": 424242}, "unknown id"),
        DroppedReply({"return": 0, "id": [1]}, "unknown id"),
        DroppedReply({"return": "a", "id": a}, "abandoned"),
        ReplyItem(b, {"error": {"class": "GenericError", "desc": "parse"}}),
        DroppedReply({"return": "stray"}, "no id"),
    ]
    assert proto.dropped_replies == 4
    assert proto.in_band_in_flight == 0


def test_abandoned_in_order_command_keeps_its_place() -> None:
    proto = ready()
    a, _ = proto.send_command("a")
    b, _ = proto.send_command("b")
    proto.abandon(a)
    assert proto.in_band_in_flight == 2  # the server still runs it
    items = proto.receive_data(line({"return": "a"}) + line({"return": "b"}))
    assert items == [DroppedReply({"return": "a"}, "abandoned"), ReplyItem(b, {"return": "b"})]
    c, _ = proto.send_command("c")
    proto.forget(c)  # never written
    assert proto.in_flight == 0 and proto.in_band_in_flight == 0


@pytest.mark.parametrize(
    "data, match",
    [
        (b"{oops}\n", "malformed JSON"),
        (b"[]\n", "not an object"),
        (b"\xff\n", "malformed JSON"),
        (b'{"return": {}}\n', "expected the QMP greeting"),
        (b'{"QMP": {"version": 1, "capabilities": []}}\n', "greeting is malformed"),
    ],
)
def test_violations_before_greeting_close_the_protocol(data: bytes, match: str) -> None:
    proto = QMPProtocol()
    with pytest.raises(QMPProtocolError, match=match):
        proto.receive_data(data)
    assert proto.state is State.CLOSED
    with pytest.raises(UsageError, match="closed"):
        proto.send_command("x")


def test_maximum_message_size() -> None:
    proto = QMPProtocol(max_message_size=100)
    proto.receive_data(b'{"QMP": {"version": {}, "capabilities": []}}\n')
    proto.receive_data(b"x" * 60)
    with pytest.raises(MessageTooLargeError, match="maximum of 100 bytes"):
        proto.receive_data(b"x" * 60)
    proto = QMPProtocol(max_message_size=100)
    with pytest.raises(MessageTooLargeError):
        proto.receive_data(b'{"QMP": ' + b" " * 200 + b"}\n")


def test_negotiation_failure_and_state_rules() -> None:
    proto = QMPProtocol()
    with pytest.raises(UsageError, match="awaiting greeting"):
        proto.send_command("query-status")
    with pytest.raises(UsageError):
        proto.start_negotiation()
    proto.receive_data(b'{"QMP": {"version": {}, "capabilities": []}}\n')
    request = json.loads(proto.start_negotiation())
    assert request["arguments"] == {}
    with pytest.raises(QMPProtocolError, match="negotiation failed: no"):
        proto.receive_data(
            line({"error": {"class": "GenericError", "desc": "no"}, "id": request["id"]})
        )
    assert proto.state is State.CLOSED


def test_no_negotiation_and_no_oob() -> None:
    proto = QMPProtocol(negotiate=False)
    proto.receive_data(b'{"QMP": {"version": {}, "capabilities": []}}\n')
    assert proto.state is State.READY
    with pytest.raises(UsageError, match="out of band"):
        proto.send_command("x", oob=True)
    with pytest.raises(UsageError, match="JSON"):
        proto.send_command("x", {"bad": {1, 2}})
    assert proto.in_flight == 0 and proto.in_band_in_flight == 0


def test_end_of_stream() -> None:
    proto = ready()
    proto.send_command("x")
    assert proto.receive_data(b'{"retu') == []
    assert proto.receive_data(b"") == [ClosedItem(partial=True)]
    assert proto.state is State.CLOSED and proto.in_flight == 0
    assert proto.receive_data(b"") == []
