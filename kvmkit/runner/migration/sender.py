"""The source side: pre-copy rounds from a dirty-page source, then stop-and-copy.

As QEMU's ``migration/ram.c``: round 0 sends all memory while the guest runs; each later
round sends what the dirty log reported since the previous one; when the remainder
would take no longer than the downtime target at the cost per page the last dirty
round measured (so at least one dirty round runs: round 0's long zero runs say nothing
of what scattered pages cost), or the round limit is reached, the vCPUs are paused,
the remainder and the state are sent, and the source waits for the destination's
verdict.  A failure raises
:class:`MigrationError`; resuming the guest is the caller's job (it still owns it).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvmkit import __version__
from kvmkit.errors import KvmError
from kvmkit.kvm.dirty import iter_dirty_runs
from kvmkit.kvm.vm import Vm
from kvmkit.runner.migration.errors import MigrationError, TransportError
from kvmkit.runner.migration.protocol import (
    MAX_REPLY_BYTES,
    MAX_RUN_PAGES,
    PAGE_SIZE,
    Encoder,
    Layout,
    decode_reply,
)


class DirtySource(Protocol):
    """Where the sender learns which pages the guest wrote."""

    def start(self) -> None:
        """Begin tracking now (forget what was dirty before)."""

    def collect(self) -> list[tuple[int, int]]:
        """``(guest-physical address, pages)`` runs written since the last call."""
        ...


class BitmapDirtySource:
    """``KVM_GET_DIRTY_LOG`` on every region (all must be added with ``log_dirty``)."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        missing = [r for r in vm.regions if not r.log_dirty]
        if missing:
            raise MigrationError(
                f"{missing[0]!r} does not log dirty pages; add it with log_dirty=True"
            )

    def start(self) -> None:
        for region in self.vm.regions:
            self.vm.get_dirty_bitmap(region)

    def collect(self) -> list[tuple[int, int]]:
        runs = []
        for region in self.vm.regions:
            base = int(region.guest_phys)
            bitmap = self.vm.get_dirty_bitmap(region)
            runs += [(base + first * PAGE_SIZE, n) for first, n in iter_dirty_runs(bitmap)]
        return runs


class RingDirtySource:
    """The per-vCPU dirty rings (``Vm.enable_dirty_ring`` before the vCPUs; regions with
    ``log_dirty``).  Harvests every ring, then ``KVM_RESET_DIRTY_RINGS``."""

    def __init__(self, vm: Vm) -> None:
        if not vm.dirty_ring_entries:
            raise MigrationError("the VM has no dirty ring; enable it before creating vCPUs")
        self.vm = vm
        self._slots = {r.slot: int(r.guest_phys) for r in vm.regions}

    def start(self) -> None:
        self.collect()

    def collect(self) -> list[tuple[int, int]]:
        pages = set()
        slots = self._slots
        for cpu in self.vm.vcpus:
            for slot, offset in cpu.dirty_ring().harvest():
                base = slots.get(slot)
                if base is not None:
                    pages.add(base + offset * PAGE_SIZE)
        self.vm.reset_dirty_rings()
        return _runs(sorted(pages))


#: Clean pages between two dirty runs that are sent anyway, to make one record of both:
#: a record costs ~10 us of Python on the two ends, a page's bytes a few us (copies and
#: the stream checksum on both ends), measured on this project's 2-core host.
MERGE_GAP_PAGES = 2


def _merge_gaps(vm: Vm, runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``runs`` (in address order) with gaps of up to :data:`MERGE_GAP_PAGES` clean pages
    filled, where those pages are guest memory.  Sending a clean page is always right:
    it holds what the destination would otherwise keep from an earlier round."""
    out: list[tuple[int, int]] = []
    for gpa, n in runs:
        if out:
            first, count = out[-1]
            end = first + count * PAGE_SIZE
            gap = gpa - end
            if 0 <= gap <= MERGE_GAP_PAGES * PAGE_SIZE and _is_memory(vm, end, gap):
                out[-1] = (first, count + gap // PAGE_SIZE + n)
                continue
        out.append((gpa, n))
    return out


def _is_memory(vm: Vm, gpa: int, length: int) -> bool:
    return length == 0 or any(r.contains(gpa, length) for r in vm.regions)


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for gpa in pages:
        if runs and runs[-1][0] + runs[-1][1] * PAGE_SIZE == gpa:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((gpa, 1))
    return runs


@dataclass
class MigrationStats:
    """What a migration cost.  ``rounds[i]`` is the pages sent in round i (round 0 is
    all memory, zero pages included); the last round is the stop-and-copy one."""

    rounds: list[int] = field(default_factory=list)
    bytes_sent: int = 0
    zero_pages: int = 0
    total_s: float = 0.0
    downtime_s: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "rounds": len(self.rounds),
            "pages_per_round": self.rounds,
            "bytes": self.bytes_sent,
            "zero_pages": self.zero_pages,
            "total_ms": round(self.total_s * 1000, 3),
            "downtime_ms": round(self.downtime_s * 1000, 3),
        }


class _Out:
    """Buffered ``sendall`` mapping socket failures to :class:`TransportError`."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def write(self, parts: list[bytes | memoryview]) -> None:
        for p in parts:
            self.buf += p
        if len(self.buf) >= 1 << 20:
            self.flush()

    def flush(self) -> None:
        try:
            self.sock.sendall(self.buf)
        except TimeoutError:
            raise TransportError("the destination stopped reading (timed out)") from None
        except OSError as exc:
            raise TransportError(f"the connection to the destination broke: {exc}") from None
        self.buf.clear()


def send_vm(
    sock: socket.socket,
    vm: Vm,
    source: DirtySource,
    *,
    pause: Callable[[], None],
    state: Callable[[], bytes],
    downtime_ms: float = 50.0,
    max_rounds: int = 30,
    progress: Callable[[int, int], None] | None = None,
    machine: dict[str, Any] | None = None,
) -> MigrationStats:
    """Migrate ``vm``'s memory and then ``state()`` over ``sock``.

    ``machine`` (the runner's JSON-able settings) goes in the hello, so the destination
    can build its machine while the pages flow rather than during the downtime.

    The guest runs during the pre-copy rounds; ``pause()`` must stop every vCPU (and
    return once none is in ``KVM_RUN``), after which ``state()`` returns the STATE payload
    (:class:`~kvmkit.runner.migration.vmstate.MigratedState` bytes).  ``progress(round,
    pages)`` is called after each round.  Returns when the destination has acknowledged;
    raises :class:`MigrationError` otherwise (a KVM failure included) — the guest may
    then be paused, and the caller resumes it.
    """
    if downtime_ms < 0 or max_rounds < 1:
        raise MigrationError(f"downtime {downtime_ms} ms / {max_rounds} rounds: give >= 0 and >= 1")
    if not vm.vcpus or not vm.regions:
        raise MigrationError("the VM has no vCPUs or no memory to migrate")
    with _kvm_errors_as_migration_errors():
        return _send_vm(
            sock, vm, source, pause, state, downtime_ms, max_rounds, progress, machine or {}
        )


@contextlib.contextmanager
def _kvm_errors_as_migration_errors() -> Iterator[None]:
    try:
        yield
    except KvmError as exc:
        raise MigrationError(f"migration failed on the source: {exc}") from exc


def _send_vm(
    sock: socket.socket,
    vm: Vm,
    source: DirtySource,
    pause: Callable[[], None],
    state: Callable[[], bytes],
    downtime_ms: float,
    max_rounds: int,
    progress: Callable[[int, int], None] | None,
    machine: dict[str, Any],
) -> MigrationStats:
    """The body of :func:`send_vm` (arguments already checked)."""
    stats = MigrationStats()
    enc = Encoder()
    out = _Out(sock)
    start = time.perf_counter()
    regions = vm.regions
    layout = Layout(
        tuple((int(r.guest_phys), r.size) for r in regions), len(vm.vcpus), __version__, machine
    )
    out.write(enc.header(layout))
    source.start()

    def send_runs(runs: list[tuple[int, int]]) -> int:
        sent = 0
        for gpa, count in runs:
            while count:  # a run may cross from one region into an adjacent one
                region = vm.region_for(gpa)
                here = min(count, (int(region.end) - gpa) // PAGE_SIZE)
                with region.memoryview() as view:
                    base = gpa - int(region.guest_phys)
                    for i in range(0, here, MAX_RUN_PAGES):
                        n = min(MAX_RUN_PAGES, here - i)
                        off = base + i * PAGE_SIZE
                        parts = enc.pages(gpa + i * PAGE_SIZE, view[off : off + n * PAGE_SIZE])
                        if len(parts) == 1:
                            stats.zero_pages += n
                        out.write(parts)
                sent += here
                gpa += here * PAGE_SIZE
                count -= here
        return sent

    def finish_round(pages: int) -> None:
        out.write(enc.round_end(len(stats.rounds), pages))
        out.flush()
        stats.rounds.append(pages)
        if progress is not None:
            progress(len(stats.rounds) - 1, pages)

    # round 0: everything, guest running
    finish_round(send_runs([(int(r.guest_phys), r.size // PAGE_SIZE) for r in regions]))

    # What a page costs is learnt from the dirty rounds only: round 0 is mostly long
    # zero runs, far cheaper per page than the scattered pages a dirty round sends.
    page_s: float | None = None
    pending = source.collect()
    while len(stats.rounds) < max_rounds:
        pages = sum(n for _, n in pending)
        if pages == 0 or (page_s is not None and pages * page_s * 1000 <= downtime_ms):
            break
        t0 = time.perf_counter()
        finish_round(send_runs(_merge_gaps(vm, pending)))
        page_s = (time.perf_counter() - t0) / pages
        pending = source.collect()

    # stop and copy
    paused = time.perf_counter()
    pause()
    final = {gpa + i * PAGE_SIZE for gpa, n in pending + source.collect() for i in range(n)}
    finish_round(send_runs(_merge_gaps(vm, _runs(sorted(final)))))
    out.write(enc.state(state()))
    out.write(enc.end())
    out.flush()
    stats.bytes_sent = enc.bytes_out
    ok, error = _read_reply(sock)
    stats.downtime_s = time.perf_counter() - paused
    stats.total_s = time.perf_counter() - start
    if not ok:
        raise MigrationError(f"the destination refused the migration: {error}")
    return stats


def _read_reply(sock: socket.socket) -> tuple[bool, str]:
    data = b""
    try:
        while b"\n" not in data and len(data) <= MAX_REPLY_BYTES:
            chunk = sock.recv(MAX_REPLY_BYTES)
            if not chunk:
                raise TransportError("the destination closed the connection without a verdict")
            data += chunk
    except TimeoutError:
        raise TransportError("the destination gave no verdict (timed out)") from None
    except OSError as exc:
        raise TransportError(f"the connection to the destination broke: {exc}") from None
    return decode_reply(data)
