"""``KVM_CHECK_EXTENSION`` capability numbers (``KVM_CAP_*`` in ``<linux/kvm.h>``)."""

from __future__ import annotations

import enum


class Cap(enum.IntEnum):
    """Capabilities kvmkit asks about.  Values are the kernel ABI and never change."""

    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    PIT = 11
    MP_STATE = 14
    COALESCED_MMIO = 15
    SYNC_MMU = 16
    SET_GUEST_DEBUG = 23
    IRQ_ROUTING = 25
    IRQFD = 32
    PIT2 = 33
    IOEVENTFD = 36
    SET_IDENTITY_MAP_ADDR = 37
    ADJUST_CLOCK = 39
    INTERNAL_ERROR_DATA = 40
    VCPU_EVENTS = 41
    DEBUGREGS = 50
    X86_ROBUST_SINGLESTEP = 51
    XSAVE = 55
    XCRS = 56
    TSC_CONTROL = 60
    GET_TSC_KHZ = 61
    MAX_VCPUS = 66
    TSC_DEADLINE_TIMER = 72
    READONLY_MEM = 81
    SPLIT_IRQCHIP = 121
    MAX_VCPU_ID = 128
    IMMEDIATE_EXIT = 136
    MANUAL_DIRTY_LOG_PROTECT2 = 168
    DIRTY_LOG_RING = 192
    SET_GUEST_DEBUG2 = 195
    DIRTY_LOG_RING_ACQ_REL = 223
    PIT_STATE2 = 35
    KVMCLOCK_CTRL = 76
    SREGS2 = 200
    XSAVE2 = 208


#: The capabilities ``kvmkit info`` reports, in order, with what each means for the runner.
RUNNER_CAPS: dict[Cap, str] = {
    Cap.IRQCHIP: "in-kernel interrupt controllers (PIC, IOAPIC, LAPIC)",
    Cap.PIT2: "in-kernel i8254 timer",
    Cap.USER_MEMORY: "guest memory from user-space mappings",
    Cap.READONLY_MEM: "read-only memory slots (ROM; writes exit as MMIO)",
    Cap.DIRTY_LOG_RING: "dirty-page ring (faster dirty tracking for migration)",
    Cap.IMMEDIATE_EXIT: "kvm_run.immediate_exit (race-free vCPU kick)",
    Cap.SET_GUEST_DEBUG: "single-step and breakpoints",
}
