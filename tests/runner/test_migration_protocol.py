"""The migration stream without sockets or KVM: round trips under any chunking, and every
truncation, corruption or version mismatch is a ProtocolError."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmkit.runner.migration import (
    Decoder,
    Encoder,
    Layout,
    MigrationError,
    ProtocolError,
    parse_address,
)
from kvmkit.runner.migration.protocol import (
    VERSION,
    End,
    Hello,
    Pages,
    RoundEnd,
    State,
    ZeroPages,
)

LAYOUT = Layout(((0, 0x10000), (0x100000, 0x8000)), 2, "0.1.0")
PAGE = 4096


def _stream() -> bytes:
    enc = Encoder()
    parts = enc.header(LAYOUT)
    parts += enc.pages(0x1000, bytes([7]) * PAGE * 2)
    parts += enc.pages(0x100000, bytes(PAGE))  # all zero -> ZERO record
    parts += enc.zero(0x4000, 3)
    parts += enc.round_end(0, 5)
    parts += enc.pages(0x107000, bytes(range(256)) * 16)
    parts += enc.round_end(1, 1)
    parts += enc.state(b'{"vcpus": []}')
    parts += enc.end()
    return b"".join(bytes(p) for p in parts)


STREAM = _stream()


def _decode(data: bytes, cuts: list[int] | None = None) -> list[object]:
    dec = Decoder()
    events: list[object] = []
    pos = 0
    for cut in sorted(cuts or []) + [len(data)]:
        events += dec.feed(data[pos:cut])
        pos = cut
    dec.eof()
    return events


def test_round_trip() -> None:
    events = _decode(STREAM)
    assert events == [
        Hello(LAYOUT),
        Pages(0x1000, bytes([7]) * PAGE * 2),
        ZeroPages(0x100000, 1),
        ZeroPages(0x4000, 3),
        RoundEnd(0, 5),
        Pages(0x107000, bytes(range(256)) * 16),
        RoundEnd(1, 1),
        State(b'{"vcpus": []}'),
        End(),
    ]


@given(st.lists(st.integers(0, len(STREAM)), max_size=20))
def test_any_chunking_gives_the_same_events(cuts: list[int]) -> None:
    assert _decode(STREAM, cuts) == _decode(STREAM)


@given(st.integers(0, len(STREAM) - 1))
def test_every_truncation_is_a_protocol_error(cut: int) -> None:
    with pytest.raises(ProtocolError):
        _decode(STREAM[:cut])


def test_stream_that_stops_mid_page_says_so() -> None:
    cut = STREAM.index(bytes([7]) * 100) + 100
    with pytest.raises(ProtocolError, match="mid-page"):
        _decode(STREAM[:cut])


@settings(max_examples=300)
@given(st.integers(0, len(STREAM) - 1), st.integers(1, 255))
def test_every_corruption_is_a_protocol_error(pos: int, xor: int) -> None:
    data = bytearray(STREAM)
    data[pos] ^= xor
    with pytest.raises(ProtocolError):
        _decode(bytes(data))


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_anything_else(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        _decode(data)


def test_version_mismatch() -> None:
    data = bytearray(STREAM)
    struct.pack_into("<H", data, 8, 1)  # version 1 ended with SHA-256, not XXH3-128
    with pytest.raises(ProtocolError, match=f"version 1; this kvmkit speaks {VERSION}"):
        Decoder().feed(bytes(data))


def test_bad_magic_is_caught_early() -> None:
    with pytest.raises(ProtocolError, match="magic"):
        Decoder().feed(b"HTTP/1.1")


def test_run_outside_memory_is_refused() -> None:
    enc = Encoder()
    parts = enc.header(LAYOUT) + enc.pages(0x20000, bytes([1]) * PAGE)
    with pytest.raises(ProtocolError, match="outside guest memory"):
        Decoder().feed(b"".join(bytes(p) for p in parts))


def test_data_after_end_is_refused() -> None:
    with pytest.raises(ProtocolError, match="after the end"):
        Decoder().feed(STREAM + b"x")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("tcp:127.0.0.1:4444", "tcp:127.0.0.1:4444"),
        ("tcp:[::1]:80", "tcp:[::1]:80"),
        ("unix:/tmp/x.sock", "unix:/tmp/x.sock"),
    ],
)
def test_addresses(text: str, shown: str) -> None:
    assert str(parse_address(text)) == shown


@pytest.mark.parametrize("text", ["tcp:host", "tcp:host:70000", "tcp::80", "udp:x:1", "unix:", "x"])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(MigrationError, match="address|transport"):
        parse_address(text)
