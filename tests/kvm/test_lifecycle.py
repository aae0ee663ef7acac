"""Closing, and the per-object state calls: registers, MSRs, CPUID, LAPIC, FPU, events."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmkit.errors import KvmIoctlError
from kvmkit.kvm import Cap, ClosedError, Kvm, KvmUnavailableError, Regs, Vm
from kvmkit.kvm.modes import setup_long_mode


def test_calls_on_a_closed_vm_raise_closed_error(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    mem = vm.add_memory(0, 0x10000)
    cpu = vm.create_vcpu(0)
    vm.close()
    vm.close()  # idempotent
    for call in (
        lambda: vm.add_memory(0x10000, 0x1000),
        lambda: vm.create_vcpu(1),
        lambda: vm.get_clock(),
        lambda: cpu.run(),
        lambda: cpu.get_regs(),
        lambda: cpu.kick(),
        lambda: mem.read(0, 1),
    ):
        with pytest.raises(ClosedError):
            call()
    assert vm.closed and cpu.closed


def test_closed_kvm_refuses_calls() -> None:
    kvm = Kvm()
    kvm.check_extension(Cap.USER_MEMORY)  # answers kept from before the close
    kvm.msr_index_list()
    kvm.close()
    for call in (
        kvm.create_vm,
        lambda: kvm.check_extension(Cap.USER_MEMORY),
        kvm.msr_index_list,
        kvm.supported_cpuid,
    ):
        with pytest.raises(ClosedError, match="Kvm.*closed"):
            call()


def test_kept_answers_are_the_kernels_and_callers_get_their_own_copies(kvm: Kvm) -> None:
    msrs, cpuid = kvm.msr_index_list(), kvm.supported_cpuid()
    msrs.clear()
    cpuid.clear()
    assert kvm.msr_index_list() and kvm.supported_cpuid()  # the kept lists are untouched
    fresh = Kvm()
    with fresh:
        assert fresh.msr_index_list() == kvm.msr_index_list()
        assert fresh.supported_cpuid() == kvm.supported_cpuid()
        assert [fresh.check_extension(c) for c in Cap] == [kvm.check_extension(c) for c in Cap]


def test_failed_ioctl_names_ioctl_errno_and_object(vm: Vm) -> None:
    vm.create_irqchip()
    with pytest.raises(KvmIoctlError) as info:
        vm.create_irqchip()  # a second irqchip is refused by KVM
    err = info.value
    assert err.ioctl == "KVM_CREATE_IRQCHIP" and err.errno > 0 and "Vm(fd=" in str(err)


def test_system_queries(kvm: Kvm) -> None:
    assert kvm.api_version == 12
    assert kvm.check_extension(Cap.USER_MEMORY) > 0
    assert kvm.vcpu_mmap_size >= 4096
    assert kvm.backend in ("vmx", "svm", "pvm", "unknown")
    cpuid = kvm.supported_cpuid()
    assert any(e.function == 0 for e in cpuid) and any(e.function == 0x80000001 for e in cpuid)
    msrs = kvm.msr_index_list()
    assert 0x10 in msrs  # IA32_TSC


def test_vcpu_state_round_trips(vm: Vm) -> None:
    vm.create_irqchip()
    vm.create_pit2()
    vm.add_memory(0, 0x100000)
    cpu = vm.create_vcpu(0)
    setup_long_mode(cpu, entry=0x1000, stack=0x8000)
    cpu.set_regs(Regs(rax=1, rbx=2, rip=0x1234, rflags=0x202))
    regs = cpu.get_regs()
    assert (regs.rax, regs.rbx, regs.rip) == (1, 2, 0x1234)
    assert "rip=0x0000000000001234" in regs.format()
    sregs = cpu.get_sregs()
    assert sregs.efer & 0x500 == 0x500
    cpu.set_msrs({0xC0000102: 0xDEAD000})  # KERNEL_GS_BASE
    assert cpu.get_msrs([0xC0000102]) == {0xC0000102: 0xDEAD000}
    assert any(e.function == 1 for e in cpu.get_cpuid2())
    lapic = cpu.get_lapic()
    assert len(lapic) == 1024
    cpu.set_lapic(lapic)
    fpu = cpu.get_fpu()
    fpu.fcw = 0x37F
    cpu.set_fpu(fpu)
    assert cpu.get_fpu().fcw == 0x37F
    events = cpu.get_vcpu_events()
    cpu.set_vcpu_events(events)
    assert cpu.get_mp_state() in (0, 1, 2, 3, 4)
    assert vm.get_clock() > 0
    vm.irq_line(4, True)
    vm.irq_line(4, False)


def test_a_path_that_is_not_kvm_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(KvmUnavailableError, match="does not exist"):
        Kvm(str(tmp_path / "no-such-kvm"))
    with pytest.raises(KvmUnavailableError, match="/dev/null is not a KVM device"):
        Kvm("/dev/null")
