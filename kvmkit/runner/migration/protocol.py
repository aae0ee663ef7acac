"""The migration stream, free of I/O (the h11 shape): an encoder that returns bytes and a
decoder that is fed bytes and returns events.

Stream, version 2 (all integers little-endian)::

    header   "KVMKITMG" | u16 version | u16 0 | u32 n | n bytes of hello JSON
             hello = {"kvmkit_version", "page_size": 4096, "vcpu_count",
                      "memory": [{"guest_phys", "size"}, ...]}
    record   u8 kind | 3 bytes 0 | u32 count | u64 addr | payload
      PAGES  addr = guest-physical address, count = pages (1..256), payload count*4096 bytes
      ZERO   addr, count = pages that are all zero; no payload
      ROUND  addr = round number, count = pages sent in that round; no payload
      STATE  count = payload bytes (<= MAX_STATE_BYTES): the final vCPU/VM/device state JSON
      END    count = 16, payload = XXH3-128 of every byte of the stream before this record
             (version 1 had SHA-256: 15 times slower, and a stream is checked, not signed)
    reply    (destination to source, after END) one JSON line {"ok": true} or
             {"ok": false, "error": "..."}, at most MAX_REPLY_BYTES

Every page run must lie inside one region of the hello; nothing may follow END; the
destination uses nothing from the stream (beyond memory it will discard) before END's
checksum matched.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import xxhash

from kvmkit.runner.migration.errors import ProtocolError

MAGIC = b"KVMKITMG"
VERSION = 2
DIGEST_BYTES = 16  # XXH3-128
PAGE_SIZE = 4096
MAX_RUN_PAGES = 256
MAX_HELLO_BYTES = 1 << 20
MAX_STATE_BYTES = 64 << 20
MAX_REPLY_BYTES = 4096

PAGES, ZERO, ROUND, STATE, END = 1, 2, 3, 4, 5
_KINDS = {PAGES: "PAGES", ZERO: "ZERO", ROUND: "ROUND", STATE: "STATE", END: "END"}
_HEADER = struct.Struct("<8sHHI")
_RECORD = struct.Struct("<B3xIQ")


@dataclass(frozen=True)
class Layout:
    """What the hello carries: guest memory regions (guest_phys, size), vCPU count, and
    (optionally) the runner's machine settings, so the destination can build the machine
    before the last round instead of during the downtime."""

    regions: tuple[tuple[int, int], ...]
    vcpu_count: int
    kvmkit_version: str = ""
    machine: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "kvmkit_version": self.kvmkit_version,
            "page_size": PAGE_SIZE,
            "vcpu_count": self.vcpu_count,
            "memory": [{"guest_phys": g, "size": s} for g, s in self.regions],
        }
        if self.machine:
            out["machine"] = self.machine
        return out

    @classmethod
    def from_dict(cls, d: Any) -> Layout:
        try:
            if d["page_size"] != PAGE_SIZE:
                raise ProtocolError(f"stream page size {d['page_size']!r} is not {PAGE_SIZE}")
            regions = []
            for r in d["memory"]:
                g, s = r["guest_phys"], r["size"]
                if not all(isinstance(x, int) and not isinstance(x, bool) for x in (g, s)):
                    raise TypeError
                if g < 0 or s <= 0 or g % PAGE_SIZE or s % PAGE_SIZE or g + s > 1 << 52:
                    raise ProtocolError(f"stream memory region {g:#x}+{s:#x} is invalid")
                regions.append((g, s))
            vcpus = d["vcpu_count"]
            version = d.get("kvmkit_version", "")
            machine = d.get("machine", {})
            if not isinstance(vcpus, int) or not 0 < vcpus <= 1024 or not isinstance(version, str):
                raise TypeError
            if not isinstance(machine, dict):
                raise TypeError
        except (KeyError, TypeError, AttributeError):
            raise ProtocolError("the stream's hello is malformed") from None
        return cls(tuple(sorted(regions)), vcpus, version, machine)

    def check_run(self, gpa: int, pages: int) -> None:
        end = gpa + pages * PAGE_SIZE
        for g, s in self.regions:
            if g <= gpa and end <= g + s:
                return
        raise ProtocolError(f"page run {gpa:#x}+{pages} pages is outside guest memory")


# ---- events the decoder returns ---------------------------------------------------------
@dataclass(frozen=True)
class Hello:
    """The stream's opening: the guest's memory layout and machine settings."""

    layout: Layout


@dataclass(frozen=True)
class Pages:
    """Guest pages starting at ``gpa``, their bytes in ``data`` (whole pages)."""

    gpa: int
    data: bytes


@dataclass(frozen=True)
class ZeroPages:
    """``count`` all-zero pages starting at ``gpa`` (sent as a run, not as bytes)."""

    gpa: int
    count: int


@dataclass(frozen=True)
class RoundEnd:
    """The end of pre-copy round ``round``, which sent ``pages`` pages."""

    round: int
    pages: int


@dataclass(frozen=True)
class State:
    """The stopped machine's state (vCPUs, VM, devices) as one serialised blob."""

    blob: bytes


@dataclass(frozen=True)
class End:
    """The end of the stream; the decoder has checked its XXH3-128 checksum."""

    pass


Event = Hello | Pages | ZeroPages | RoundEnd | State | End


class Encoder:
    """Turns migration steps into stream bytes and keeps the running checksum."""

    def __init__(self) -> None:
        self._sum = xxhash.xxh3_128()
        self.bytes_out = 0

    def _emit(self, *parts: bytes | memoryview) -> list[bytes | memoryview]:
        for p in parts:
            self._sum.update(p)
            self.bytes_out += len(p)
        return list(parts)

    def header(self, layout: Layout) -> list[bytes | memoryview]:
        hello = json.dumps(layout.to_dict(), sort_keys=True).encode()
        return self._emit(_HEADER.pack(MAGIC, VERSION, 0, len(hello)), hello)

    def pages(self, gpa: int, data: bytes | memoryview) -> list[bytes | memoryview]:
        """A PAGES record (or ZERO when ``data`` is all zero) for up to MAX_RUN_PAGES.
        ``data`` may be a live view of guest memory that a running vCPU writes."""
        n, rest = divmod(len(data), PAGE_SIZE)
        if rest or not 0 < n <= MAX_RUN_PAGES:
            raise ValueError(
                f"a page record holds 1..{MAX_RUN_PAGES} whole pages, not {len(data)} bytes"
            )
        # One copy, hashed and sent as is: guest memory may change under a live view.
        data = bytes(data)
        if data == (_ZERO_PAGE if n == 1 else _ZEROS[: len(data)]):  # 1: no slice copy
            return self._emit(_RECORD.pack(ZERO, n, gpa))
        return self._emit(_RECORD.pack(PAGES, n, gpa), data)

    def zero(self, gpa: int, count: int) -> list[bytes | memoryview]:
        return self._emit(_RECORD.pack(ZERO, count, gpa))

    def round_end(self, number: int, pages: int) -> list[bytes | memoryview]:
        return self._emit(_RECORD.pack(ROUND, pages, number))

    def state(self, blob: bytes) -> list[bytes | memoryview]:
        if len(blob) > MAX_STATE_BYTES:
            raise ProtocolError(f"state of {len(blob)} bytes is over the {MAX_STATE_BYTES} limit")
        return self._emit(_RECORD.pack(STATE, len(blob), 0), blob)

    def end(self) -> list[bytes | memoryview]:
        digest = self._sum.digest()
        return self._emit(_RECORD.pack(END, len(digest), 0), digest)


_ZEROS = bytes(MAX_RUN_PAGES * PAGE_SIZE)
_ZERO_PAGE = bytes(PAGE_SIZE)


class Decoder:
    """Fed stream bytes, returns events; raises :class:`ProtocolError` at the first
    fault.  Call :meth:`eof` when the peer closes: a stream that stops before END
    (mid-page, mid-record) is an error there."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._sum = xxhash.xxh3_128()
        self.layout: Layout | None = None
        self.ended = False
        self.bytes_in = 0
        self._last: tuple[int, int] | None = None  # kind and address of the last record

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        if self.ended and data:
            raise ProtocolError("data after the end of the migration stream")
        self._buf += data
        self.bytes_in += len(data)
        events: list[Event] = []
        while True:
            event = self._next()
            if event is None:
                return events
            events.append(event)
            if isinstance(event, End):
                if self._buf:
                    raise ProtocolError("data after the end of the migration stream")
                return events

    def _take(self, n: int) -> bytes:
        with memoryview(self._buf) as view:
            out = view[:n].tobytes()  # one copy (a bytearray slice would be a second)
        del self._buf[:n]
        self._sum.update(out)
        return out

    def _next(self) -> Event | None:
        buf = self._buf
        if self.layout is None:
            if len(buf) < _HEADER.size:
                if buf and not MAGIC.startswith(bytes(buf[: len(MAGIC)])):
                    raise ProtocolError("not a kvmkit migration stream (bad magic)")
                return None
            magic, version, _, n = _HEADER.unpack_from(buf)
            if magic != MAGIC:
                raise ProtocolError("not a kvmkit migration stream (bad magic)")
            if version != VERSION:
                raise ProtocolError(
                    f"the source speaks migration stream version {version}; this kvmkit "
                    f"speaks {VERSION}",
                    hint="use the same kvmkit version on both ends",
                )
            if n > MAX_HELLO_BYTES:
                raise ProtocolError(f"hello of {n} bytes is over the {MAX_HELLO_BYTES} limit")
            if len(buf) < _HEADER.size + n:
                return None
            self._take(_HEADER.size)
            try:
                hello = json.loads(self._take(n))
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise ProtocolError("the stream's hello is not valid JSON") from None
            self.layout = Layout.from_dict(hello)
            return Hello(self.layout)
        if len(buf) < _RECORD.size:
            return None
        kind, count, addr = _RECORD.unpack_from(buf)
        if kind not in _KINDS:
            raise ProtocolError(f"unknown record kind {kind} after {self._last_text()}")
        payload = 0
        if kind == PAGES:
            if not 0 < count <= MAX_RUN_PAGES:
                raise ProtocolError(f"PAGES record of {count} pages (limit {MAX_RUN_PAGES})")
            self.layout.check_run(addr, count)
            payload = count * PAGE_SIZE
        elif kind == ZERO:
            if count == 0:
                raise ProtocolError("ZERO record of 0 pages")
            self.layout.check_run(addr, count)
        elif kind == STATE:
            if count > MAX_STATE_BYTES:
                raise ProtocolError(f"STATE of {count} bytes is over the {MAX_STATE_BYTES} limit")
            payload = count
        elif kind == END:
            if count != DIGEST_BYTES:
                raise ProtocolError("END record without its XXH3-128 checksum")
            if len(buf) < _RECORD.size + DIGEST_BYTES:
                return None
            want = self._sum.digest()  # of every byte before this record
            self._take(_RECORD.size)
            if self._take(DIGEST_BYTES) != want:
                raise ProtocolError("the migration stream's checksum does not match")
            self.ended = True
            return End()
        if len(buf) < _RECORD.size + payload:
            return None
        self._take(_RECORD.size)
        self._last = (kind, addr)  # formatted only for an error: records are many
        if kind == PAGES:
            return Pages(addr, self._take(payload))
        if kind == ZERO:
            return ZeroPages(addr, count)
        if kind == ROUND:
            return RoundEnd(addr, count)
        return State(self._take(payload))

    def _last_text(self) -> str:
        if self._last is None:
            return "the header"
        kind, addr = self._last
        return f"{_KINDS[kind]} at {addr:#x}"

    def eof(self) -> None:
        """The peer closed the stream: an error unless END was reached."""
        if self.ended:
            return
        if self.layout is None:
            raise ProtocolError("the migration stream ended before its header")
        if len(self._buf) >= _RECORD.size:
            kind, count, addr = _RECORD.unpack_from(self._buf)
            if kind == PAGES:
                raise ProtocolError(
                    f"the migration stream ended mid-page (in {count} pages at {addr:#x})",
                    hint="the source went away; it keeps running",
                )
        raise ProtocolError(
            f"the migration stream ended after {self._last_text()}, before its end record",
            hint="the source went away; it keeps running",
        )


def encode_reply(ok: bool, error: str = "") -> bytes:
    return (json.dumps({"ok": ok, "error": error[:1000]}) + "\n").encode()


def decode_reply(data: bytes) -> tuple[bool, str]:
    try:
        d = json.loads(data.split(b"\n", 1)[0])
        return bool(d["ok"]), str(d.get("error", ""))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ProtocolError("the destination's reply is malformed") from None
