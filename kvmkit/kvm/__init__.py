r"""A typed, safe wrapper over the KVM ioctls: one class per file descriptor.

>>> from kvmkit.kvm import Kvm
>>> vm = Kvm().create_vm()
>>> mem = vm.add_memory(0, 0x10000)
>>> mem.write(0x1000, code)
>>> cpu = vm.create_vcpu(0)
>>> cpu.run()
IoOut(port=66, size=1, data=b'\\x07', count=1)
"""

from kvmkit.errors import (
    ClosedError,
    GuestMemoryAccessError,
    KvmError,
    KvmIoctlError,
    KvmUnavailableError,
    MemoryLayoutError,
)
from kvmkit.kvm.caps import Cap
from kvmkit.kvm.cpuid import CpuidEntry
from kvmkit.kvm.exits import (
    Debug,
    FailEntry,
    Hlt,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    IrqWindowOpen,
    MmioRead,
    MmioWrite,
    Shutdown,
    SystemEvent,
    UnknownExit,
    VcpuExit,
)
from kvmkit.kvm.memory import GuestAddress, GuestMemory
from kvmkit.kvm.system import Kvm
from kvmkit.kvm.vcpu import Regs, Vcpu
from kvmkit.kvm.vm import Vm

__all__ = [
    "Kvm",
    "Vm",
    "Vcpu",
    "GuestMemory",
    "GuestAddress",
    "Regs",
    "Cap",
    "CpuidEntry",
    "VcpuExit",
    "IoOut",
    "IoIn",
    "MmioWrite",
    "MmioRead",
    "Hlt",
    "Shutdown",
    "FailEntry",
    "InternalError",
    "Debug",
    "SystemEvent",
    "Interrupted",
    "IrqWindowOpen",
    "UnknownExit",
    "KvmError",
    "KvmIoctlError",
    "KvmUnavailableError",
    "ClosedError",
    "MemoryLayoutError",
    "GuestMemoryAccessError",
]
