"""KVM ioctl request numbers, computed with ioctl-opt from the structure sizes the C
compiler reported to cffi (``ffi.sizeof``), exactly as ``<linux/kvm.h>`` computes them.

``tests/kvm/test_abi.py`` checks every number here against the header's own macro.
"""

from __future__ import annotations

from ioctl_opt import IOC, IOC_NONE, IOC_READ, IOC_WRITE

from kvmkit._ffi import ffi

KVMIO = 0xAE


def _io(nr: int) -> int:
    return int(IOC(IOC_NONE, KVMIO, nr, 0))


def _ior(nr: int, ctype: str) -> int:
    return int(IOC(IOC_READ, KVMIO, nr, ffi.sizeof(ctype)))


def _iow(nr: int, ctype: str) -> int:
    return int(IOC(IOC_WRITE, KVMIO, nr, ffi.sizeof(ctype)))


def _iowr(nr: int, ctype: str) -> int:
    return int(IOC(IOC_READ | IOC_WRITE, KVMIO, nr, ffi.sizeof(ctype)))


# /dev/kvm
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, "struct kvm_msr_list")
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, "struct kvm_cpuid2")

# VM fd
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, "struct kvm_dirty_log")
KVM_SET_USER_MEMORY_REGION = _iow(0x46, "struct kvm_userspace_memory_region")
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, "__u64")
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, "struct kvm_irq_level")
KVM_SET_GSI_ROUTING = _iow(0x6A, "struct kvm_irq_routing")
KVM_IRQFD = _iow(0x76, "struct kvm_irqfd")
KVM_CREATE_PIT2 = _iow(0x77, "struct kvm_pit_config")
KVM_IOEVENTFD = _iow(0x79, "struct kvm_ioeventfd")
KVM_SIGNAL_MSI = _iow(0xA5, "struct kvm_msi")
KVM_SET_CLOCK = _iow(0x7B, "struct kvm_clock_data")
KVM_GET_CLOCK = _ior(0x7C, "struct kvm_clock_data")

# vCPU fd
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, "struct kvm_regs")
KVM_SET_REGS = _iow(0x82, "struct kvm_regs")
KVM_GET_SREGS = _ior(0x83, "struct kvm_sregs")
KVM_SET_SREGS = _iow(0x84, "struct kvm_sregs")
KVM_GET_MSRS = _iowr(0x88, "struct kvm_msrs")
KVM_SET_MSRS = _iow(0x89, "struct kvm_msrs")
KVM_GET_FPU = _ior(0x8C, "struct kvm_fpu")
KVM_SET_FPU = _iow(0x8D, "struct kvm_fpu")
KVM_GET_LAPIC = _ior(0x8E, "struct kvm_lapic_state")
KVM_SET_LAPIC = _iow(0x8F, "struct kvm_lapic_state")
KVM_SET_CPUID2 = _iow(0x90, "struct kvm_cpuid2")
KVM_GET_CPUID2 = _iowr(0x91, "struct kvm_cpuid2")
KVM_GET_MP_STATE = _ior(0x98, "struct kvm_mp_state")
KVM_SET_MP_STATE = _iow(0x99, "struct kvm_mp_state")
KVM_SET_GUEST_DEBUG = _iow(0x9B, "struct kvm_guest_debug")
KVM_GET_VCPU_EVENTS = _ior(0x9F, "struct kvm_vcpu_events")
KVM_SET_VCPU_EVENTS = _iow(0xA0, "struct kvm_vcpu_events")

# complete vCPU and VM state, dirty tracking (snapshot and migration)
KVM_GET_IRQCHIP = _iowr(0x62, "struct kvm_irqchip")
KVM_SET_IRQCHIP = _ior(0x63, "struct kvm_irqchip")  # sic: the kernel declares it _IOR
KVM_GET_PIT2 = _ior(0x9F, "struct kvm_pit_state2")
KVM_SET_PIT2 = _iow(0xA0, "struct kvm_pit_state2")
KVM_ENABLE_CAP = _iow(0xA3, "struct kvm_enable_cap")
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, "struct kvm_clear_dirty_log")
KVM_RESET_DIRTY_RINGS = _io(0xC7)
KVM_GET_DEBUGREGS = _ior(0xA1, "struct kvm_debugregs")
KVM_SET_DEBUGREGS = _iow(0xA2, "struct kvm_debugregs")
KVM_SET_TSC_KHZ = _io(0xA2)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_XSAVE = _ior(0xA4, "struct kvm_xsave")
KVM_SET_XSAVE = _iow(0xA5, "struct kvm_xsave")
KVM_GET_XCRS = _ior(0xA6, "struct kvm_xcrs")
KVM_SET_XCRS = _iow(0xA7, "struct kvm_xcrs")
KVM_KVMCLOCK_CTRL = _io(0xAD)
KVM_GET_SREGS2 = _ior(0xCC, "struct kvm_sregs2")
KVM_SET_SREGS2 = _iow(0xCD, "struct kvm_sregs2")
KVM_GET_XSAVE2 = _ior(0xCF, "struct kvm_xsave")

#: Every request number above, by its C name (used for error messages and the ABI test).
ALL: dict[str, int] = {
    k: v for k, v in dict(globals()).items() if k.startswith("KVM_") and isinstance(v, int)
}
NAMES: dict[int, str] = {v: k for k, v in ALL.items()}
