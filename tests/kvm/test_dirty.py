"""Dirty-page tracking on the real /dev/kvm: a guest writes known pages of a logged slot
and the bitmap (plain and with manual clear) or the dirty ring reports exactly them."""

from __future__ import annotations

import struct
import threading

import pytest

from kvmkit.kvm import IoOut, Kvm, KvmError, Vm
from kvmkit.kvm.caps import Cap
from kvmkit.kvm.dirty import count_dirty, iter_dirty_pages, iter_dirty_runs
from kvmkit.kvm.modes import setup_long_mode

CODE_AT = 0x1000
TABLE_AT = 0x3000
DATA_AT = 0x200000
DATA_SIZE = 0x100000
# 64-bit, CPL 3: for each address in the table at 0x3000 (count first) store a qword,
# then `out 0xe9, al` and start again:
#  start: mov esi, 0x3000; mov rcx, [rsi]; add rsi, 8
#  1: mov rdi, [rsi]; mov [rdi], rcx; add rsi, 8; dec rcx; jnz 1b
#     out 0xe9, al; jmp start
GUEST = bytes.fromhex("be00300000488b0e4883c608488b3e48890f4883c60848ffc975f1e6e9ebe1")
PAGES = [0, 3, 4, 5, 64, 65, 130, 255]  # page numbers in the data slot


def _start(vm: Vm, *, ring: bool = False) -> tuple[object, list[int]]:
    vm.add_memory(0, 0x100000)
    data = vm.add_memory(DATA_AT, DATA_SIZE, log_dirty=True)
    addrs = [DATA_AT + p * 4096 + 8 * (i % 7) for i, p in enumerate(PAGES)]
    vm.write(TABLE_AT, struct.pack(f"<{len(addrs) + 1}Q", len(addrs), *addrs))
    vm.write(CODE_AT, GUEST)
    cpu = vm.create_vcpu(0)
    setup_long_mode(cpu, entry=CODE_AT, stack=0x8000, cpl=3)
    return data, addrs


def _one_pass(vm: Vm) -> None:
    cpu = vm.vcpus[0]
    watchdog = threading.Timer(30, cpu.kick)
    watchdog.start()
    try:
        exit_ = cpu.run()
    finally:
        watchdog.cancel()
    assert isinstance(exit_, IoOut) and exit_.port == 0xE9, exit_


def test_bitmap_reports_exactly_the_written_pages_and_clears(vm: Vm) -> None:
    data, _ = _start(vm)
    assert count_dirty(vm.get_dirty_bitmap(data)) == 0
    _one_pass(vm)
    bitmap = vm.get_dirty_bitmap(data)
    assert len(bitmap) == DATA_SIZE // 4096 // 8
    assert list(iter_dirty_pages(bitmap)) == PAGES
    assert list(iter_dirty_runs(bitmap)) == [(0, 1), (3, 3), (64, 2), (130, 1), (255, 1)]
    assert count_dirty(vm.get_dirty_bitmap(data)) == 0  # the read cleared it
    _one_pass(vm)
    assert list(iter_dirty_pages(vm.get_dirty_bitmap(data))) == PAGES
    # the older list form agrees
    _one_pass(vm)
    assert [(a - DATA_AT) // 4096 for a in vm.get_dirty_log(data)] == PAGES


def test_manual_protect_keeps_bits_until_cleared(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        if not vm.check_extension(Cap.MANUAL_DIRTY_LOG_PROTECT2):
            pytest.skip("this KVM has no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
        vm.enable_manual_dirty_log_protect()
        data, _ = _start(vm)
        _one_pass(vm)
        bitmap = vm.get_dirty_bitmap(data)
        assert list(iter_dirty_pages(bitmap)) == PAGES
        assert vm.get_dirty_bitmap(data) == bitmap  # not cleared by the read
        half = bytearray(len(bitmap))
        half[0] = bitmap[0]  # clear pages 0..7 only
        vm.clear_dirty_log(data, bytes(half))
        assert list(iter_dirty_pages(vm.get_dirty_bitmap(data))) == [64, 65, 130, 255]
        vm.clear_dirty_log(data, bitmap)
        assert count_dirty(vm.get_dirty_bitmap(data)) == 0
        _one_pass(vm)  # re-protected: the guest's writes are seen again
        assert list(iter_dirty_pages(vm.get_dirty_bitmap(data))) == PAGES
        with pytest.raises(KvmError, match="64-page aligned"):
            vm.clear_dirty_log(data, bitmap, first_page=3)


def test_dirty_ring_reports_exactly_the_written_pages(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        if not vm.check_extension(Cap.DIRTY_LOG_RING) and not vm.check_extension(
            Cap.DIRTY_LOG_RING_ACQ_REL
        ):
            pytest.skip("this KVM has no dirty ring")
        vm.enable_dirty_ring(4096)
        data, _ = _start(vm)
        ring = vm.vcpus[0].dirty_ring()
        assert ring.harvest() == []
        _one_pass(vm)
        got = ring.harvest()
        assert sorted(off for slot, off in got if slot == data.slot) == PAGES
        assert vm.reset_dirty_rings() >= len(PAGES)
        assert ring.harvest() == []
        _one_pass(vm)  # reset re-protected the pages: they are reported again
        again = ring.harvest()
        assert sorted(off for slot, off in again if slot == data.slot) == PAGES
        vm.reset_dirty_rings()


def test_dirty_ring_must_precede_vcpus(vm: Vm) -> None:
    vm.create_vcpu(0)
    with pytest.raises(KvmError, match="before any vCPU"):
        vm.enable_dirty_ring()
    with pytest.raises(KvmError, match="no dirty ring"):
        vm.vcpus[0].dirty_ring()


def test_ring_size_is_checked(vm: Vm) -> None:
    with pytest.raises(KvmError, match="power of two"):
        vm.enable_dirty_ring(1000)
