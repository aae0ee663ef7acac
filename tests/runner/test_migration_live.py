"""Live migration between two real VMs on /dev/kvm, over unix and TCP sockets: memory of
a running guest is copied while it dirties pages (dirty bitmap or dirty ring), then the
state; afterwards both memories are equal and both guests continue identically."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_snapshot_restore import DirtyingGuest

from kvmkit.kvm import Kvm, Vm
from kvmkit.kvm.caps import Cap
from kvmkit.runner.migration import (
    BitmapDirtySource,
    Encoder,
    Layout,
    MigratedState,
    MigrationError,
    ProtocolError,
    RingDirtySource,
    TransportError,
    accept,
    add_layout_memory,
    connect,
    listen,
    receive_vm,
    send_vm,
)
from kvmkit.runner.migration.protocol import VERSION, decode_reply
from kvmkit.runner.snapshot import capture_state


@pytest.fixture
def kvm(require_kvm: None) -> Iterator[Kvm]:
    with Kvm() as k:
        yield k


class _Destination:
    """A receiving thread filling ``vm``; ``join()`` returns its stats or raises."""

    def __init__(self, listener: socket.socket, vm: Vm) -> None:
        self.vm = vm
        self.result: object = None
        self.thread = threading.Thread(target=self._run, args=(listener,), daemon=True)
        self.thread.start()

    def _run(self, listener: socket.socket) -> None:
        try:
            with accept(listener, timeout=60) as conn:
                self.result = receive_vm(
                    conn,
                    prepare=lambda layout: add_layout_memory(self.vm, layout),
                    apply_state=lambda vm, blob: MigratedState.from_bytes(blob).apply(vm) and None,
                )
        except BaseException as exc:
            self.result = exc

    def join(self) -> object:
        self.thread.join(120)
        assert not self.thread.is_alive(), "the destination did not finish"
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


def _address(tmp_path: Path, transport: str) -> tuple[socket.socket, str]:
    if transport == "unix":
        addr = f"unix:{tmp_path / 'mig.sock'}"
        return listen(addr), addr
    listener = listen("tcp:127.0.0.1:0")
    return listener, f"tcp:127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.parametrize("tracking", ["bitmap", "ring"])
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_running_guest_migrates_and_continues_identically(
    kvm: Kvm, tmp_path: Path, tracking: str, transport: str
) -> None:
    with kvm.create_vm() as src, kvm.create_vm() as dst:
        if tracking == "ring":
            if not src.check_extension(Cap.DIRTY_LOG_RING_ACQ_REL) and not src.check_extension(
                Cap.DIRTY_LOG_RING
            ):
                pytest.skip("this KVM has no dirty ring")
            src.enable_dirty_ring(65536)
        guest = DirtyingGuest(src, log_dirty=True)
        guest.run_outputs(1)
        source = RingDirtySource(src) if tracking == "ring" else BitmapDirtySource(src)
        listener, addr = _address(tmp_path, transport)
        with listener:
            dest = _Destination(listener, dst)
            guest.start()  # dirtying pages while the memory is copied
            with connect(addr, timeout=60) as sock:
                stats = send_vm(
                    sock,
                    src,
                    source,
                    pause=guest.stop,
                    state=lambda: MigratedState(*capture_state(src)).to_bytes(),
                    downtime_ms=1,
                    max_rounds=4,
                )
            incoming = dest.join()
        total_pages = sum(r.size for r in src.regions) // 4096
        assert stats.rounds[0] == total_pages
        assert len(stats.rounds) >= 2
        assert incoming.rounds == stats.rounds  # type: ignore[attr-defined]
        assert stats.downtime_s > 0 and stats.bytes_sent > 0
        for region in src.regions:
            assert dst.read(region.guest_phys, region.size) == src.read(
                region.guest_phys, region.size
            ), f"memory differs in {region!r}"
        expected = guest.run_outputs(3)
        assert DirtyingGuest(dst, setup=False).run_outputs(3) == expected


def test_stream_cut_mid_page_is_refused_and_the_source_is_told(kvm: Kvm) -> None:
    layout = Layout(((0, 0x100000),), 1, "0.1.0")
    enc = Encoder()
    data = b"".join(bytes(p) for p in enc.header(layout) + enc.pages(0x1000, b"\x01" * 8192))
    a, b = socket.socketpair()
    with a, b, kvm.create_vm() as dst:
        b.settimeout(10)
        a.sendall(data[: len(data) - 5000])
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(ProtocolError, match="mid-page"):
            receive_vm(b, lambda lay: add_layout_memory(dst, lay), lambda vm, s: None)
        a.settimeout(10)
        ok, error = decode_reply(a.recv(4096))
        assert not ok and "mid-page" in error


def test_version_mismatch_is_refused_and_reported(kvm: Kvm) -> None:
    enc = Encoder()
    data = bytearray(b"".join(bytes(p) for p in enc.header(Layout(((0, 0x10000),), 1))))
    struct.pack_into("<H", data, 8, 7)
    a, b = socket.socketpair()
    with a, b, kvm.create_vm() as dst:
        b.settimeout(10)
        a.sendall(bytes(data))
        with pytest.raises(ProtocolError, match="version 7"):
            receive_vm(b, lambda lay: add_layout_memory(dst, lay), lambda vm, s: None)
        a.settimeout(10)
        assert decode_reply(a.recv(4096)) == (
            False,
            f"the source speaks migration stream version 7; this kvmkit speaks {VERSION} "
            "(use the same kvmkit version on both ends)",
        )


def test_destination_gone_leaves_a_source_that_resumes(kvm: Kvm) -> None:
    with kvm.create_vm() as src:
        guest = DirtyingGuest(src, log_dirty=True)
        guest.run_outputs(1)
        a, b = socket.socketpair()
        with a:
            a.settimeout(10)
            b.close()  # the destination went away
            with pytest.raises(TransportError):
                send_vm(
                    a,
                    src,
                    BitmapDirtySource(src),
                    pause=lambda: None,
                    state=lambda: b"{}",
                )
        assert guest.run_outputs(1) == [0x80000]  # the source runs on


def test_connect_to_nobody_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="cannot connect"):
        connect(f"unix:{tmp_path / 'nobody.sock'}", timeout=2)


def test_runs_across_adjacent_regions_are_split(kvm: Kvm) -> None:
    """A dirty run that crosses from one region into the next adjacent one is sent as
    two records and lands in both regions."""
    from kvmkit.runner.migration.sender import _runs

    with kvm.create_vm() as src, kvm.create_vm() as dst:
        src.add_memory(0, 0x10000, log_dirty=True)
        src.add_memory(0x10000, 0x10000, log_dirty=True)
        src.create_vcpu(0)
        src.write(0xF000, b"\x11" * 0x1000)  # last page of one region,
        src.write(0x10000, b"\x11" * 0x1000)  # first page of the next
        assert _runs([0xF000, 0x10000]) == [(0xF000, 2)]

        class Fixed:
            def start(self) -> None:
                pass

            def collect(self) -> list[tuple[int, int]]:
                return [(0xF000, 2)]

        a, b = socket.socketpair()
        with a, b:
            a.settimeout(30)
            b.settimeout(30)
            got: dict[str, object] = {}
            t = threading.Thread(
                target=lambda: got.setdefault(
                    "r",
                    receive_vm(b, lambda lay: add_layout_memory(dst, lay), lambda vm, s: None),
                )
            )
            t.start()
            stats = send_vm(a, src, Fixed(), pause=lambda: None, state=lambda: b"{}", max_rounds=1)
            t.join(60)
        assert stats.rounds[-1] == 2
        assert dst.read(0xF000, 0x1000) + dst.read(0x10000, 0x1000) == b"\x11" * 0x2000


class _Scripted:
    """A dirty source that reports the runs it is given, one list per collect()."""

    def __init__(self, *reports: list[tuple[int, int]], then: list[tuple[int, int]]) -> None:
        self.reports = list(reports)
        self.then = then

    def start(self) -> None:
        pass

    def collect(self) -> list[tuple[int, int]]:
        return self.reports.pop(0) if self.reports else self.then


def _send_with(
    kvm: Kvm, source: _Scripted, *, downtime_ms: float, max_rounds: int = 30
) -> list[int]:
    """Pages per round of a migration of a 64 KiB VM whose dirty log is ``source``."""
    with kvm.create_vm() as src, kvm.create_vm() as dst:
        src.add_memory(0, 0x10000, log_dirty=True)
        src.create_vcpu(0)
        a, b = socket.socketpair()
        with a, b:
            a.settimeout(30)
            b.settimeout(30)
            t = threading.Thread(
                target=receive_vm,
                args=(b, lambda lay: add_layout_memory(dst, lay), lambda vm, s: None),
            )
            t.start()
            stats = send_vm(
                a,
                src,
                source,
                pause=lambda: None,
                state=lambda: b"{}",
                downtime_ms=downtime_ms,
                max_rounds=max_rounds,
            )
            t.join(60)
        return stats.rounds


def test_a_dirty_round_runs_before_the_stop_whatever_round_0_cost(kvm: Kvm) -> None:
    """Round 0 (mostly zero runs) says nothing of what scattered pages cost: the sender
    always sends one dirty round while the guest runs, then stops once the rest fits."""
    rounds = _send_with(kvm, _Scripted([(0x1000, 3)], then=[(0x5000, 1)]), downtime_ms=1000)
    assert rounds == [16, 3, 1]  # learn in round 1, then 1 page fits 1 s


def test_nothing_dirty_means_no_dirty_round(kvm: Kvm) -> None:
    rounds = _send_with(kvm, _Scripted([], then=[]), downtime_ms=0)
    assert rounds == [16, 0]


def test_a_target_never_met_stops_at_the_round_limit(kvm: Kvm) -> None:
    rounds = _send_with(kvm, _Scripted(then=[(0x2000, 2)]), downtime_ms=0, max_rounds=4)
    assert rounds == [16, 2, 2, 2, 2]  # 4 live rounds, then the stop-and-copy one


def test_small_clean_gaps_are_sent_in_one_record_but_never_a_hole(kvm: Kvm) -> None:
    from kvmkit.runner.migration.sender import MERGE_GAP_PAGES, _merge_gaps

    page, gap = 4096, MERGE_GAP_PAGES
    with kvm.create_vm() as vm:
        vm.add_memory(0, 0x10000)
        vm.add_memory(0x11000, 0x10000)  # a hole of 1 page between the regions
        runs = [(0, 1), (page * (1 + gap), 2), (page * (3 + 2 * gap), 1)]
        assert _merge_gaps(vm, runs) == [(0, 4 + 2 * gap)]
        assert _merge_gaps(vm, [(0, 1), (page * (2 + gap), 1)]) == [(0, 1), (page * (2 + gap), 1)]
        hole_end = [(0xF000, 1), (0x11000, 1)]  # 1 page apart, but that page is no memory
        assert _merge_gaps(vm, hole_end) == hole_end
        last_first = [(0xF000, 1), (0x10000 - page, 1)]  # not in address order: kept
        assert _merge_gaps(vm, last_first) == last_first
