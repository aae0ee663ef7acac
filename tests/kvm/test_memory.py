"""Memory slots: placement errors, removal, access bounds, dirty logging, read-only slots."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmkit.kvm import (
    ClosedError,
    GuestAddress,
    GuestMemoryAccessError,
    Hlt,
    Kvm,
    MemoryLayoutError,
    MmioWrite,
    Vm,
)
from kvmkit.kvm.modes import setup_long_mode


def test_overlapping_region_is_refused(vm: Vm) -> None:
    vm.add_memory(0x10000, 0x10000)
    with pytest.raises(MemoryLayoutError, match="overlaps slot 0"):
        vm.add_memory(0x18000, 0x10000)
    with pytest.raises(MemoryLayoutError, match="overlaps"):
        vm.add_memory(0, 0x20000)
    vm.add_memory(0x20000, 0x1000)  # adjacent is fine


def test_misaligned_region_is_refused(vm: Vm) -> None:
    with pytest.raises(MemoryLayoutError, match="not page-aligned"):
        vm.add_memory(0x1001, 0x1000)
    with pytest.raises(MemoryLayoutError, match="not page-aligned"):
        vm.add_memory(0x1000, 0x1800)


def test_zero_sized_region_is_refused(vm: Vm) -> None:
    with pytest.raises(MemoryLayoutError, match="must be > 0"):
        vm.add_memory(0, 0)


def test_oversized_regions_are_refused(vm: Vm) -> None:
    with pytest.raises(MemoryLayoutError, match="larger than the host"):
        vm.add_memory(0, 1 << 45)
    with pytest.raises(MemoryLayoutError, match="address space"):
        vm.add_memory(1 << 60, 0x1000)


def test_slot_exhaustion_is_a_clear_error_and_removal_frees_a_slot(kvm: Kvm) -> None:
    with kvm.create_vm(max_memory_slots=3) as vm:
        regions = [vm.add_memory(i * 0x1000, 0x1000) for i in range(3)]
        with pytest.raises(MemoryLayoutError, match="no free memory slot: all 3"):
            vm.add_memory(0x10000, 0x1000)
        vm.remove_memory(regions[1])
        again = vm.add_memory(0x10000, 0x1000)
        assert again.slot == 1
        with pytest.raises(MemoryLayoutError, match="does not belong"):
            vm.remove_memory(regions[1])
        with pytest.raises(ClosedError):
            regions[1].read(0x1000, 1)


def test_access_is_bounds_checked(vm: Vm) -> None:
    mem = vm.add_memory(0x4000, 0x2000)
    mem.write(0x4000, b"abc")
    assert mem.read(0x4000, 3) == b"abc"
    assert vm.read(0x4001, 2) == b"bc"
    with pytest.raises(GuestMemoryAccessError, match="outside guest memory"):
        mem.read(0x5FFF, 2)
    with pytest.raises(GuestMemoryAccessError):
        mem.write(0x3FFF, b"x")
    with pytest.raises(GuestMemoryAccessError, match="no guest memory"):
        vm.write(0x9000, b"x")
    assert mem.end == GuestAddress(0x6000) and repr(mem.guest_phys) == "GuestAddress(0x4000)"


def test_memoryview_is_zero_copy(vm: Vm) -> None:
    mem = vm.add_memory(0, 0x1000)
    with mem.memoryview() as view:
        view[10:12] = b"hi"
    assert mem.read(10, 2) == b"hi"


def test_file_backed_memory_shares_the_file(vm: Vm, tmp_path: Path) -> None:
    backing = tmp_path / "ram"
    mem = vm.add_memory(0, 0x2000, backing=backing)
    mem.write(0x1000, b"persist")
    assert backing.read_bytes()[0x1000:0x1007] == b"persist"


def _anon_huge_kib(mem: object) -> int:
    """AnonHugePages of the host mapping that backs ``mem`` (from /proc/self/smaps)."""
    start = mem.host_address  # type: ignore[attr-defined]
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        fields = line.split()
        if "-" in fields[0] and int(fields[0].split("-")[0], 16) == start:
            for detail in lines[i + 1 :]:
                if detail.startswith("AnonHugePages:"):
                    return int(detail.split()[1])
    raise AssertionError("mapping not found in /proc/self/smaps")


def test_ram_gets_transparent_huge_pages_by_default(vm: Vm) -> None:
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off on this host")
    mem = vm.add_memory(0, 8 << 20)
    assert mem.backed_by == "thp"
    mem.write(0, b"\x01" * (8 << 20))  # fault every page in
    assert _anon_huge_kib(mem) >= 2048


def test_explicit_hugepages_map_or_say_why_not(vm: Vm) -> None:
    from kvmkit.kvm.memory import free_hugepages_bytes

    if free_hugepages_bytes() >= 0x400000:
        mem = vm.add_memory(0x200000, 0x400000, hugepages=True)
        assert mem.backed_by == "hugetlbfs"
        mem.write(0x3FFFF8 + 0x200000, b"12345678")
        assert mem.read(0x5FFFF8, 8) == b"12345678"
    else:
        with pytest.raises(MemoryLayoutError, match="explicit huge pages: the guest needs 2 free"):
            vm.add_memory(0x200000, 0x400000, hugepages=True)
    assert vm.regions == [] or all(r.backed_by == "hugetlbfs" for r in vm.regions)


def test_mem_path_directory_backs_ram_with_an_unlinked_file(vm: Vm, tmp_path: Path) -> None:
    mem = vm.add_memory(0, 0x200000, backing=tmp_path)
    mem.write(0x1000, b"ram")
    assert mem.read(0x1000, 3) == b"ram"
    assert mem.backed_by == "file"
    assert list(tmp_path.iterdir()) == []  # nothing left behind


_STORE_LOOP = (
    bytes([0x48, 0xC7, 0xC0, 0x00, 0x30, 0x00, 0x00])  # mov rax, 0x3000
    + bytes([0xC6, 0x00, 0x01])  # mov byte [rax], 1
    + bytes([0x48, 0xC7, 0xC0, 0x00, 0x50, 0x00, 0x00])  # mov rax, 0x5000
    + bytes([0xC6, 0x00, 0x01])  # mov byte [rax], 1
    + bytes([0xF4])
)


def test_dirty_log_reports_written_pages(vm: Vm) -> None:
    mem = vm.add_memory(0, 0x100000, log_dirty=True)
    mem.write(0x1000, _STORE_LOOP)
    cpu = vm.create_vcpu(0)
    setup_long_mode(cpu, entry=0x1000, stack=0x8000)
    vm.get_dirty_log(mem)  # clear what setup wrote
    assert cpu.run() == Hlt()
    dirty = vm.get_dirty_log(mem)
    assert 0x3000 in dirty and 0x5000 in dirty
    assert 0x4000 not in dirty
    assert vm.get_dirty_log(mem) == []  # reading the log cleared it
    plain = vm.add_memory(0x200000, 0x1000)
    with pytest.raises(MemoryLayoutError, match="log_dirty"):
        vm.get_dirty_log(plain)


def test_write_to_readonly_memory_exits_as_mmio(vm: Vm) -> None:
    vm.add_memory(0, 0x100000)
    rom = vm.add_memory(0x100000, 0x1000, readonly=True)
    rom.write(0x100000, b"\xaa")
    vm.write(
        0x1000,
        bytes([0x48, 0xC7, 0xC0, 0x00, 0x00, 0x10, 0x00])  # mov rax, 0x100000
        + bytes([0x8A, 0x18])  # mov bl, [rax]   (reads straight from the ROM)
        + bytes([0xC6, 0x00, 0x55])  # mov byte [rax], 0x55  (write exits)
        + bytes([0xF4]),
    )
    cpu = vm.create_vcpu(0)
    setup_long_mode(cpu, entry=0x1000, stack=0x8000)
    assert cpu.run() == MmioWrite(addr=0x100000, data=b"\x55")
    assert cpu.run() == Hlt()
    assert cpu.get_regs().rbx & 0xFF == 0xAA
    assert rom.read(0x100000, 1) == b"\xaa"
