"""The destination side: read the stream into guest memory, and hand over the state only
once the end record's checksum matched."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmkit.kvm.vm import Vm
from kvmkit.runner.migration.errors import MigrationError, ProtocolError, TransportError
from kvmkit.runner.migration.protocol import (
    PAGE_SIZE,
    Decoder,
    Hello,
    Layout,
    Pages,
    RoundEnd,
    State,
    ZeroPages,
    encode_reply,
)

_ZERO = bytes(1 << 20)


@dataclass
class IncomingStats:
    """What the destination received: pages per round and bytes in all."""

    rounds: list[int] = field(default_factory=list)
    bytes_received: int = 0
    pages: int = 0
    zero_pages: int = 0
    total_s: float = 0.0


def add_layout_memory(vm: Vm, layout: Layout) -> Vm:
    """Give a fresh ``vm`` the memory regions of ``layout`` (anonymous memory)."""
    for gpa, size in layout.regions:
        vm.add_memory(gpa, size)
    return vm


def check_layout(vm: Vm, layout: Layout) -> None:
    have = tuple((int(r.guest_phys), r.size) for r in vm.regions)
    if have != layout.regions:
        raise ProtocolError(f"the source's memory layout {layout.regions} is not this VM's {have}")


def receive_vm(
    sock: socket.socket,
    prepare: Callable[[Layout], Vm],
    apply_state: Callable[[Vm, bytes], None],
) -> IncomingStats:
    """Receive a migration on ``sock``.

    ``prepare(layout)`` returns the VM to fill, with that memory layout and every byte of
    it zero (fresh anonymous memory, e.g. a new VM through :func:`add_layout_memory`):
    ZERO runs over pages this stream has not written are skipped without touching them.  After the end record's checksum matched,
    ``apply_state(vm, state_bytes)`` restores vCPUs and devices; then the source is told
    to stop (``ok``).  Any failure tells the source to resume (with the reason) and
    raises :class:`MigrationError`: the caller must discard the VM, never run it.
    """
    stats = IncomingStats()
    dec = Decoder()
    start = time.perf_counter()
    vm: Vm | None = None
    state: bytes | None = None
    written: _Written | None = None
    try:
        while True:
            try:
                data = sock.recv(1 << 20)
            except TimeoutError:
                raise TransportError("the source stopped sending (timed out)") from None
            except OSError as exc:
                raise TransportError(f"the connection to the source broke: {exc}") from None
            if not data:
                dec.eof()
            events = dec.feed(data)
            for ev in events:
                if isinstance(ev, Hello):
                    vm = prepare(ev.layout)
                    check_layout(vm, ev.layout)
                    written = _Written(ev.layout)
                    continue
                assert vm is not None and written is not None
                if isinstance(ev, Pages):
                    vm.write(ev.gpa, ev.data)
                    written.mark(ev.gpa, len(ev.data) // PAGE_SIZE)
                    stats.pages += len(ev.data) // PAGE_SIZE
                elif isinstance(ev, ZeroPages):
                    if written.any(ev.gpa, ev.count):
                        _zero(vm, ev.gpa, ev.count * PAGE_SIZE)
                    stats.zero_pages += ev.count
                elif isinstance(ev, RoundEnd):
                    stats.rounds.append(ev.pages)
                elif isinstance(ev, State):
                    if state is not None:
                        raise ProtocolError("the stream carries two STATE records")
                    state = ev.blob
            if dec.ended:
                break
        if state is None:
            raise ProtocolError("the stream ended without the VM state")
        assert vm is not None
        apply_state(vm, state)
    except MigrationError as exc:
        _reply(sock, False, str(exc))
        raise
    except Exception as exc:
        _reply(sock, False, f"the destination failed: {exc}")
        raise MigrationError(f"the destination failed to restore the VM: {exc}") from exc
    _reply(sock, True)
    stats.bytes_received = dec.bytes_in
    stats.total_s = time.perf_counter() - start
    return stats


class _Written:
    """Which pages the stream has written so far (one byte per page, per region)."""

    def __init__(self, layout: Layout) -> None:
        self._maps = [(g, bytearray(size // PAGE_SIZE)) for g, size in layout.regions]

    def _find(self, gpa: int) -> tuple[bytearray, int]:
        for base, flags in self._maps:
            if base <= gpa < base + len(flags) * PAGE_SIZE:
                return flags, (gpa - base) // PAGE_SIZE
        raise ProtocolError(f"page {gpa:#x} is outside guest memory")  # Decoder checked

    def mark(self, gpa: int, count: int) -> None:
        flags, first = self._find(gpa)
        flags[first : first + count] = b"\x01" * count

    def any(self, gpa: int, count: int) -> bool:
        flags, first = self._find(gpa)
        return flags.find(1, first, first + count) >= 0


def _zero(vm: Vm, gpa: int, length: int) -> None:
    """Zero ``length`` bytes of guest memory at ``gpa``."""
    region = vm.region_for(gpa, length)
    with region.memoryview() as view:
        base = gpa - int(region.guest_phys)
        for off in range(base, base + length, len(_ZERO)):
            end = min(off + len(_ZERO), base + length)
            view[off:end] = _ZERO[: end - off]


def _reply(sock: socket.socket, ok: bool, error: str = "") -> None:
    with contextlib.suppress(OSError):  # the source is gone; it resumes on its own
        sock.sendall(encode_reply(ok, error))
