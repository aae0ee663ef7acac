"""Tiny annotated guest programs on the real /dev/kvm, each exit asserted
(in the manner of rust-vmm kvm-ioctls' test_run_code)."""

from __future__ import annotations

import threading
import time

from kvmkit.kvm import Debug, Hlt, Interrupted, IoIn, IoOut, MmioRead, MmioWrite, Shutdown, Vm
from kvmkit.kvm.modes import setup_long_mode, setup_mode, setup_protected_mode, setup_real_mode

CODE_AT = 0x1000
STACK = 0x8000


def test_real_mode_guest_writes_a_port_and_halts(vm: Vm) -> None:
    mem = vm.add_memory(0, 0x10000)
    mem.write(
        CODE_AT,
        bytes(
            [
                0xB0,
                0x07,  # mov al, 7
                0xE6,
                0x42,  # out 0x42, al
                0xF4,  # hlt
            ]
        ),
    )
    cpu = vm.create_vcpu(0)
    setup_real_mode(cpu, entry=CODE_AT)
    assert cpu.run() == IoOut(port=0x42, size=1, data=b"\x07")
    assert cpu.run() == Hlt()
    assert cpu.get_regs().rip == CODE_AT + 5


def test_port_read_is_answered_and_lands_in_a_register(vm: Vm) -> None:
    vm.add_memory(0, 0x10000)
    vm.write(
        CODE_AT,
        bytes(
            [
                0xBA,
                0x34,
                0x12,  # mov dx, 0x1234
                0x66,
                0xED,  # in eax, dx  (32-bit in real mode via operand-size prefix)
                0xF4,  # hlt
            ]
        ),
    )
    cpu = vm.create_vcpu(0)
    setup_real_mode(cpu, entry=CODE_AT)
    exit_ = cpu.run()
    assert isinstance(exit_, IoIn) and (exit_.port, exit_.size) == (0x1234, 4)
    exit_.reply(0xCAFEF00D)
    assert cpu.run() == Hlt()
    assert cpu.get_regs().rax & 0xFFFFFFFF == 0xCAFEF00D


def test_mmio_read_answer_comes_back_in_a_register(vm: Vm) -> None:
    vm.add_memory(0, 0x100000)
    # 64-bit, CPL 0: mov rax, [0xd0000000]; mov [0xd0000008], rax; hlt
    vm.write(
        CODE_AT,
        bytes([0x48, 0xA1])
        + (0xD0000000).to_bytes(8, "little")  # movabs rax, [0xd0000000]
        + bytes([0x48, 0xA3])
        + (0xD0000008).to_bytes(8, "little")  # movabs [0xd0000008], rax
        + bytes([0xF4]),
    )
    cpu = vm.create_vcpu(0)
    setup_long_mode(cpu, entry=CODE_AT, stack=STACK)
    read = cpu.run()
    assert isinstance(read, MmioRead)
    assert read.addr == 0xD0000000 and read.length == 8
    read.reply(0x1122334455667788)
    assert cpu.run() == MmioWrite(addr=0xD0000008, data=(0x1122334455667788).to_bytes(8, "little"))
    assert cpu.run() == Hlt()
    assert cpu.get_regs().rax == 0x1122334455667788


def _count_loop(n: int) -> bytes:
    return (
        bytes([0xB9])
        + n.to_bytes(4, "little")  # mov ecx, n
        + bytes([0xFF, 0xC9, 0x75, 0xFC])  # 1: dec ecx; jnz 1b
        + bytes([0x89, 0xC8, 0xE6, 0x42])  # mov eax, ecx; out 0x42, al  (al == 0 when done)
        + bytes([0xF4])  # hlt
    )


def test_long_mode_loop_at_cpl0(vm: Vm) -> None:
    vm.add_memory(0, 0x100000)
    vm.write(CODE_AT, _count_loop(500))
    cpu = vm.create_vcpu(0)
    setup_long_mode(cpu, entry=CODE_AT, stack=STACK, cpl=0)
    assert cpu.run() == IoOut(port=0x42, size=1, data=b"\x00")
    assert cpu.run() == Hlt()
    assert cpu.get_sregs().cs.dpl == 0


def test_long_mode_loop_at_cpl3_ends_in_triple_fault_on_hlt(vm: Vm) -> None:
    vm.add_memory(0, 0x100000)
    vm.write(CODE_AT, _count_loop(1_000_000))
    cpu = vm.create_vcpu(0)
    setup_long_mode(cpu, entry=CODE_AT, stack=STACK, cpl=3)
    assert cpu.run() == IoOut(port=0x42, size=1, data=b"\x00")
    assert cpu.get_regs().rcx == 0
    # HLT is privileged: #GP at CPL 3 with no IDT -> double fault -> triple fault
    assert cpu.run() == Shutdown()


def test_protected_mode_at_cpl3_can_do_port_io(vm: Vm) -> None:
    vm.add_memory(0, 0x100000)
    vm.write(CODE_AT, _count_loop(50))
    cpu = vm.create_vcpu(0)
    setup_protected_mode(cpu, entry=CODE_AT, stack=STACK, cpl=3)
    assert cpu.run() == IoOut(port=0x42, size=1, data=b"\x00")
    assert cpu.get_sregs().cs.dpl == 3


def test_single_step_produces_debug_exits(vm: Vm) -> None:
    vm.add_memory(0, 0x10000)
    vm.write(CODE_AT, bytes([0x90, 0x90, 0x90, 0xF4]))  # nop; nop; nop; hlt
    cpu = vm.create_vcpu(0)
    setup_real_mode(cpu, entry=CODE_AT)
    cpu.set_guest_debug(single_step=True)
    pcs = []
    for _ in range(3):
        exit_ = cpu.run()
        assert isinstance(exit_, Debug)
        pcs.append(exit_.pc)
    assert pcs == [CODE_AT + 1, CODE_AT + 2, CODE_AT + 3]
    cpu.set_guest_debug(enable=False)
    assert cpu.run() == Hlt()


def test_kick_ends_a_guest_stuck_in_an_infinite_loop(vm: Vm) -> None:
    vm.add_memory(0, 0x100000)
    vm.write(CODE_AT, bytes([0xEB, 0xFE]))  # 1: jmp 1b
    cpu = vm.create_vcpu(0)
    setup_long_mode(cpu, entry=CODE_AT, stack=STACK, cpl=3)
    result: list[object] = []
    runner = threading.Thread(target=lambda: result.append(cpu.run()))
    runner.start()
    time.sleep(0.2)
    assert runner.is_alive(), "the guest should still be spinning"
    cpu.kick()
    runner.join(timeout=10)
    assert not runner.is_alive(), "kick() did not bring the vCPU back"
    assert result == [Interrupted()]
    assert cpu.get_regs().rip == CODE_AT


def test_kick_before_run_makes_the_next_run_return_at_once(vm: Vm) -> None:
    vm.add_memory(0, 0x100000)
    vm.write(CODE_AT, bytes([0xEB, 0xFE]))
    cpu = vm.create_vcpu(0)
    setup_mode(cpu, "long", entry=CODE_AT, stack=STACK, cpl=3)
    cpu.kick()
    assert cpu.run() == Interrupted()
