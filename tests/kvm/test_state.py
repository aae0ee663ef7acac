"""Complete vCPU/VM state on the real /dev/kvm: save a vCPU in the middle of a tiny guest,
restore it into a fresh VM, and the guest goes on exactly as an uninterrupted run."""

from __future__ import annotations

import threading

import pytest

from kvmkit.kvm import IoIn, IoOut, Kvm, Vm
from kvmkit.kvm.modes import setup_long_mode
from kvmkit.kvm.state import StateError, VcpuState, VmState

CODE_AT = 0x1000
STACK = 0x8000
MEM = 0x100000
# 64-bit, CPL 3 (runs natively under PVM).  An LCG in rbx, accumulated in xmm0 (so the
# XSAVE state matters), pushed and popped (stack), stored at 0x50000+rcx*8 (memory):
#     mov rbx, 0x12345; movq xmm0, rbx; mov ecx, 40
#  1: rbx = rbx * 6364136223846793005 + 1442695040888963407; movq xmm1, rbx
#     paddq xmm0, xmm1; push rbx; pop rdx; mov [0x50000+rcx*8], rdx
#     mov eax, ebx; out 0xe9, al; dec ecx; jnz 1b
#     movq rax, xmm0; out 0xea, eax; jmp .
GUEST = bytes.fromhex(
    "48c7c34523010066480f6ec3b92800000048b82d7f954c2df45158480fafd848b84f8167f77e7b0514"
    "4801c366480f6ecb660fd4c1535a488914cd0000050089d8e6e9ffc975ca66480f7ec0e7eaebfe"
)
OUTS = 41  # 40 bytes on port 0xe9, then the xmm0 sum on port 0xea (0x42 is the in-kernel PIT)


def _start(vm: Vm, *, platform: bool) -> None:
    if platform:
        vm.create_irqchip()
        vm.create_pit2()
    vm.add_memory(0, MEM)
    vm.write(CODE_AT, GUEST)
    setup_long_mode(vm.create_vcpu(0), entry=CODE_AT, stack=STACK, cpl=3)


def _outputs(vm: Vm, n: int) -> list[IoOut]:
    """The next ``n`` port writes; a guest that stops writing is kicked after 30 s (and the
    test fails on the ``Interrupted`` exit) rather than hanging."""
    cpu = vm.vcpus[0]
    got = []
    watchdog = threading.Timer(30, cpu.kick)
    watchdog.start()
    try:
        for _ in range(n):
            exit_ = cpu.run()
            assert isinstance(exit_, IoOut), exit_
            got.append(exit_)
    finally:
        watchdog.cancel()
    return got


@pytest.mark.parametrize("platform", [False, True], ids=["bare", "irqchip+pit"])
@pytest.mark.parametrize("cut", [1, 17])
def test_vcpu_saved_mid_guest_continues_in_a_fresh_vm(kvm: Kvm, platform: bool, cut: int) -> None:
    with kvm.create_vm() as ref:
        _start(ref, platform=platform)
        expected = _outputs(ref, OUTS)
        final_mem = ref.read(0x50000, 41 * 8)
    with kvm.create_vm() as src:
        _start(src, platform=platform)
        before = _outputs(src, cut)
        vcpu_blob = src.vcpus[0].save_state().to_bytes()
        vm_blob = src.save_state().to_bytes()
        memory = src.read(0, MEM)
    vcpu_state = VcpuState.from_bytes(vcpu_blob)
    vm_state = VmState.from_bytes(vm_blob)
    assert (vcpu_state.lapic is not None) == platform
    assert (vm_state.pit2 is not None) == platform
    assert len(vm_state.irqchip) == (3 if platform else 0)
    assert 0x10 in vcpu_state.msrs  # IA32_TSC is among the saved MSRs
    with kvm.create_vm() as dst:
        if platform:
            dst.create_irqchip()
            dst.create_pit2()
        dst.add_memory(0, MEM)
        dst.write(0, memory)
        dst.restore_state(vm_state)
        cpu = dst.create_vcpu(0)
        cpu.restore_state(vcpu_state)
        after = _outputs(dst, OUTS - cut)
        assert dst.read(0x50000, 41 * 8) == final_mem
        restored = cpu.save_state()
    assert before + after == expected
    assert restored.sregs == vcpu_state.sregs or restored.sregs_kind == "sregs2"


def test_state_round_trips_through_bytes(vm: Vm) -> None:
    _start(vm, platform=True)
    _outputs(vm, 3)
    state = vm.vcpus[0].save_state()
    again = VcpuState.from_bytes(state.to_bytes())
    assert again == state
    assert VmState.from_bytes(vm.save_state().to_bytes()).irqchip.keys() == {
        "pic_master",
        "pic_slave",
        "ioapic",
    }


def test_msr_list_is_filtered_to_readable_msrs(vm: Vm) -> None:
    _start(vm, platform=False)
    cpu = vm.vcpus[0]
    listed = vm.kvm.msr_index_list()
    readable = cpu.readable_msrs(listed)
    assert readable and set(readable) <= set(listed)
    assert cpu.get_msrs(readable).keys() == set(readable)
    for index in set(listed) - set(readable):
        with pytest.raises(Exception, match="not supported"):
            cpu.get_msrs([index])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(version=99),
        lambda d: d.update(sregs="!!notbase64"),
        lambda d: d.update(regs={"rax": 1}),
        lambda d: d.update(msrs=[[1, -1]]),
        lambda d: d.update(cpuid=[[1, 2]]),
        lambda d: d.update(sregs_kind="sregs3"),
    ],
)
def test_malformed_state_is_a_state_error(vm: Vm, mutate: object) -> None:
    _start(vm, platform=False)
    d = vm.vcpus[0].save_state().to_dict()
    mutate(d)  # type: ignore[operator]
    with pytest.raises(StateError):
        VcpuState.from_dict(d)


def test_state_that_does_not_fit_this_host_is_refused_before_any_write(vm: Vm) -> None:
    _start(vm, platform=False)
    cpu = vm.vcpus[0]
    state = cpu.save_state()
    regs_before = cpu.get_regs()
    state.xsave = state.xsave[:-1]
    state.regs["rip"] = 0xDEAD
    with pytest.raises(StateError, match="XSAVE"):
        cpu.restore_state(state)
    assert cpu.get_regs() == regs_before
    state = cpu.save_state()
    state.lapic = bytes(1024)
    with pytest.raises(StateError, match="irqchip"):
        cpu.restore_state(state)


def test_state_saved_right_after_an_in_exit_keeps_the_answer(kvm: Kvm) -> None:
    """The reply to an ``in`` is completed by KVM on the next KVM_RUN: save_state must
    finish it first, or the restored guest would never see the value."""
    # mov dx, 0x1234; in eax, dx; out 0xe9, eax; jmp .
    code = bytes.fromhex("66ba3412ede7e9ebfe")
    with kvm.create_vm() as src:
        src.add_memory(0, MEM)
        src.write(CODE_AT, code)
        cpu = src.create_vcpu(0)
        setup_long_mode(cpu, entry=CODE_AT, stack=STACK, cpl=3)
        exit_ = cpu.run()
        assert isinstance(exit_, IoIn) and exit_.port == 0x1234
        exit_.reply(0xC0FFEE42)
        state = cpu.save_state()
        memory = src.read(0, MEM)
    with kvm.create_vm() as dst:
        dst.add_memory(0, MEM)
        dst.write(0, memory)
        dst.create_vcpu(0).restore_state(state)
        assert _outputs(dst, 1) == [
            IoOut(port=0xE9, size=4, data=(0xC0FFEE42).to_bytes(4, "little"))
        ]


def test_two_vcpus_with_irqchip_read_back_what_was_restored(kvm: Kvm) -> None:
    """Every part of the state of a running BSP and of an AP still waiting for INIT/SIPI
    reads back as restored (the TSC and kvmclock MSRs move on, so they are left out)."""
    with kvm.create_vm() as src:
        _start(src, platform=True)
        src.create_vcpu(1)
        _outputs(src, 5)
        states = [cpu.save_state() for cpu in src.vcpus]
        vm_state = src.save_state()
    assert [s.mp_state for s in states] != [states[0].mp_state] * 2  # the AP waits
    with kvm.create_vm() as dst:
        dst.create_irqchip()
        dst.create_pit2()
        dst.add_memory(0, MEM)
        dst.restore_state(vm_state)
        for state in states:
            dst.create_vcpu(state.index).restore_state(state)
        for cpu, want in zip(dst.vcpus, states, strict=True):
            got = cpu.save_state()
            for name in ("mp_state", "regs", "sregs", "xsave", "xcrs", "debugregs", "events"):
                assert getattr(got, name) == getattr(want, name), f"vCPU {cpu.index}: {name}"
            assert got.lapic == want.lapic, f"vCPU {cpu.index}: LAPIC"
            moving = {0x10, 0x6E0} | {i for i in want.msrs if i >> 8 == 0x4B564D}
            assert {i: v for i, v in got.msrs.items() if i not in moving} == {
                i: v for i, v in want.msrs.items() if i not in moving
            }
            assert got.msrs[0x10] >= want.msrs[0x10]
        assert dst.save_state().irqchip == vm_state.irqchip
