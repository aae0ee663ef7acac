"""Snapshot and restore of a tiny running guest on the real /dev/kvm: the restored guest
(lazy and eager) continues exactly as the original; a damaged snapshot is refused."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmkit.kvm import Interrupted, IoOut, Kvm, Vm
from kvmkit.kvm.dirty import EXIT_DIRTY_RING_FULL
from kvmkit.kvm.exits import UnknownExit
from kvmkit.kvm.modes import setup_long_mode
from kvmkit.runner.snapshot import Snapshot, SnapshotError, capture_state, write_snapshot

CODE_AT = 0x1000
DATA_AT = 0x400000
DATA_SIZE = 0x400000
# 64-bit, CPL 3, forever: rbx += 1; store rbx at DATA_AT + (rbx * 40503 & 0x3ff000);
# every 2^18 iterations `out 0xe9, eax` (eax = rbx).  The next outputs are a function
# of rbx alone, and it dirties pages all over its 4 MiB data region.
#     xor ebx, ebx
#  1: inc rbx; imul rax, rbx, 40503; and eax, 0x3ff000; mov [rax+0x400000], rbx
#     test ebx, 0x3ffff; jnz 1b; mov eax, ebx; out 0xe9, eax; jmp 1b
GUEST = bytes.fromhex(
    "31db48ffc34869c3379e00002500f03f0048899800004000f7c3ffff030075e289d8e7e9ebdc"
)


class DirtyingGuest:
    """The guest above in ``vm``: low 1 MiB (code, tables, stack) + a 4 MiB data region.
    :meth:`start` runs it on a thread; :meth:`stop` kicks it and joins."""

    def __init__(self, vm: Vm, *, log_dirty: bool = False, setup: bool = True) -> None:
        self.vm = vm
        self.outputs: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        if setup:
            vm.add_memory(0, 0x100000, log_dirty=log_dirty)
            vm.add_memory(DATA_AT, DATA_SIZE, log_dirty=log_dirty)
            vm.write(CODE_AT, GUEST)
            setup_long_mode(vm.create_vcpu(0), entry=CODE_AT, stack=0x8000, cpl=3)

    def _loop(self, limit: int | None) -> None:
        cpu = self.vm.vcpus[0]
        try:
            while not self._stop.is_set():
                exit_ = cpu.run()
                if isinstance(exit_, IoOut):
                    self.outputs.append(int.from_bytes(exit_.data, "little"))
                    if limit is not None and len(self.outputs) >= limit:
                        return
                elif isinstance(exit_, UnknownExit) and exit_.reason == EXIT_DIRTY_RING_FULL:
                    self._stop.wait(0.001)  # the collector harvests and resets
                elif not isinstance(exit_, Interrupted):
                    raise AssertionError(f"unexpected exit {exit_}")
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def start(self, limit: int | None = None) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, args=(limit,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        assert self._thread is not None
        self._stop.set()
        while self._thread.is_alive():
            self.vm.vcpus[0].kick()
            self._thread.join(timeout=0.05)
        if self.error is not None:
            raise self.error

    def run_outputs(self, n: int, timeout: float = 60.0) -> list[int]:
        """Run until ``n`` more outputs (kicked and failed after ``timeout`` s)."""
        have = len(self.outputs)
        self.start(limit=have + n)
        assert self._thread is not None
        self._thread.join(timeout)
        self.stop()
        assert len(self.outputs) == have + n, "the guest stopped writing"
        return self.outputs[have:]


@pytest.fixture
def kvm(require_kvm: None) -> Iterator[Kvm]:
    with Kvm() as k:
        yield k


def _snapshot(kvm: Kvm, path: Path, *, platform: bool = False) -> tuple[list[int], list[int]]:
    """Run the guest a while, snapshot it to ``path``; return (outputs so far, the next
    three outputs of the original)."""
    with kvm.create_vm() as vm:
        if platform:
            vm.create_irqchip()
            vm.create_pit2()
        guest = DirtyingGuest(vm)
        guest.run_outputs(2)
        vcpus, vm_state = capture_state(vm)
        write_snapshot(
            path,
            vcpus=vcpus,
            vm=vm_state,
            memory=vm.regions,
            devices={"console": {"column": 3}},
            machine={"platform": platform},
        )
        before = list(guest.outputs)
        return before, guest.run_outputs(3)


def _restore(kvm: Kvm, path: Path, *, eager: bool) -> list[int]:
    snap = Snapshot.open(path, kvm=kvm, expect_vcpus=1)
    with kvm.create_vm() as vm:
        if snap.manifest.machine["platform"]:
            vm.create_irqchip()
            vm.create_pit2()
        snap.map_memory(vm, eager=eager)
        snap.restore_state(vm)
        guest = DirtyingGuest(vm, setup=False)
        return guest.run_outputs(3)


@pytest.mark.parametrize("eager", [False, True], ids=["lazy", "eager"])
@pytest.mark.parametrize("platform", [False, True], ids=["bare", "irqchip+pit"])
def test_restored_guest_continues_like_the_original(
    kvm: Kvm, tmp_path: Path, eager: bool, platform: bool
) -> None:
    path = tmp_path / "snap"
    before, expected = _snapshot(kvm, path, platform=platform)
    assert before == [0x40000, 0x80000]
    memory_file = path / "memory-1.bin"
    digest_before = memory_file.read_bytes()
    assert _restore(kvm, path, eager=eager) == expected
    assert _restore(kvm, path, eager=eager) == expected  # twice from one snapshot
    assert memory_file.read_bytes() == digest_before  # MAP_PRIVATE: the file is untouched
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["devices"] == {"console": {"column": 3}}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


@pytest.fixture
def snap(kvm: Kvm, tmp_path: Path) -> Path:
    path = tmp_path / "snap"
    _snapshot(kvm, path)
    return path


def _edit_manifest(path: Path, edit: object) -> None:
    doc = json.loads((path / "manifest.json").read_text())
    edit(doc)  # type: ignore[operator]
    (path / "manifest.json").write_text(json.dumps(doc))


def test_truncated_memory_file_is_refused(kvm: Kvm, snap: Path) -> None:
    f = snap / "memory-1.bin"
    os.truncate(f, f.stat().st_size - 4096)
    with pytest.raises(SnapshotError, match="truncated"):
        Snapshot.open(snap, kvm=kvm)


def test_corrupted_memory_is_found_by_eager_restore_and_verify(kvm: Kvm, snap: Path) -> None:
    with open(snap / "memory-1.bin", "r+b") as f:
        f.seek(0x1234)
        f.write(b"\xff")
    s = Snapshot.open(snap, kvm=kvm)
    with pytest.raises(SnapshotError, match="checksum"):
        s.verify_memory()
    with kvm.create_vm() as vm, pytest.raises(SnapshotError, match="checksum"):
        s.map_memory(vm, eager=True)
    with kvm.create_vm() as vm, pytest.raises(SnapshotError, match="checksum"):
        s.map_memory(vm, verify=True)


def test_truncated_manifest_is_refused(kvm: Kvm, snap: Path) -> None:
    m = snap / "manifest.json"
    m.write_bytes(m.read_bytes()[:-100])
    with pytest.raises(SnapshotError, match="truncated or corrupted"):
        Snapshot.open(snap, kvm=kvm)


def test_corrupted_state_is_refused(kvm: Kvm, snap: Path) -> None:
    _edit_manifest(snap, lambda d: d["vcpus"][0]["regs"].update(rip=0x1234))
    with pytest.raises(SnapshotError, match="checksum of vcpu/0"):
        Snapshot.open(snap, kvm=kvm)


def test_wrong_version_is_refused(kvm: Kvm, snap: Path) -> None:
    _edit_manifest(snap, lambda d: d.update(format_version=2))
    with pytest.raises(SnapshotError, match="format version 2"):
        Snapshot.open(snap, kvm=kvm)


def test_capability_the_host_lacks_is_refused(kvm: Kvm, snap: Path) -> None:
    # TSC_CONTROL is a real capability; if this host has it, pick one it lacks.
    from kvmkit.kvm.caps import Cap
    from kvmkit.runner.snapshot import host_capabilities

    lacking = [c.name for c in Cap if c.name not in host_capabilities(kvm)]
    if not lacking:
        pytest.skip("this host offers every capability kvmkit knows")
    _edit_manifest(snap, lambda d: d["capabilities"].append(lacking[0]))
    with pytest.raises(SnapshotError, match=f"{lacking[0]}, which this host lacks"):
        Snapshot.open(snap, kvm=kvm)


def test_different_vcpu_count_is_refused(kvm: Kvm, snap: Path) -> None:
    with pytest.raises(SnapshotError, match="has 1 vCPUs; this machine has 4"):
        Snapshot.open(snap, kvm=kvm, expect_vcpus=4)


def test_existing_target_is_not_overwritten_unless_asked(kvm: Kvm, snap: Path) -> None:
    s = Snapshot.open(snap)
    m = s.manifest
    with kvm.create_vm() as vm, pytest.raises(SnapshotError, match="already exists"):
        write_snapshot(snap, vcpus=m.vcpus, vm=m.vm, memory=[vm.add_memory(0, 4096)])
    assert Snapshot.open(snap).manifest.vcpu_count == 1


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="not a snapshot"):
        Snapshot.open(tmp_path / "nope")


def test_private_mapping_refuses_a_short_file(kvm: Kvm, tmp_path: Path) -> None:
    from kvmkit.kvm import MemoryLayoutError

    f = tmp_path / "mem.bin"
    f.write_bytes(bytes(8192))
    with kvm.create_vm() as vm, pytest.raises(MemoryLayoutError, match="needs 16384"):
        vm.add_memory(0, 16384, backing=f, private=True)
    assert f.stat().st_size == 8192  # never extended


def test_empty_snapshot_is_refused(kvm: Kvm, snap: Path, tmp_path: Path) -> None:
    m = Snapshot.open(snap).manifest
    with pytest.raises(SnapshotError, match="needs guest memory"):
        write_snapshot(tmp_path / "empty", vcpus=m.vcpus, vm=m.vm, memory=[])
