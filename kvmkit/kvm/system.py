"""``Kvm``: the ``/dev/kvm`` file descriptor — system-wide queries and VM creation."""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from kvmkit._ffi import ffi
from kvmkit.errors import KvmIoctlError, KvmUnavailableError
from kvmkit.kvm import ioctls
from kvmkit.kvm._fdobject import FdObject
from kvmkit.kvm.backend import BACKEND_MEANING, detect_backend
from kvmkit.kvm.caps import Cap
from kvmkit.kvm.cpuid import CpuidEntry

if TYPE_CHECKING:
    from kvmkit.kvm.vm import Vm

#: The only KVM API version there has ever been in mainline; anything else is refused.
SUPPORTED_API_VERSION = 12
_MAX_CPUID_ENTRIES = 256


class Kvm(FdObject):
    """An open ``/dev/kvm``.

    >>> with Kvm() as kvm:
    ...     vm = kvm.create_vm()
    """

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailableError(
                f"{path} does not exist",
                hint="load kvm_intel or kvm_amd (or run on a host with KVM); "
                "in a VM, enable nested virtualization",
            ) from None
        except PermissionError:
            raise KvmUnavailableError(
                f"no permission to open {path}",
                hint="add yourself to the 'kvm' group (sudo usermod -aG kvm $USER) and log in again",
            ) from None
        try:
            version = self._ioctl(ioctls.KVM_GET_API_VERSION)
        except KvmIoctlError as exc:
            self.close()
            raise KvmUnavailableError(
                f"{path} is not a KVM device: KVM_GET_API_VERSION failed with errno {exc.errno}"
            ) from None
        if version != SUPPORTED_API_VERSION:
            self.close()
            raise KvmUnavailableError(
                f"{path} speaks KVM API version {version}; kvmkit needs {SUPPORTED_API_VERSION}"
            )
        self.api_version = version
        self._mmap_size: int | None = None
        # what /dev/kvm answers never changes while it is open: asked once each
        self._extensions: dict[int, int] = {}
        self._supported_cpuid: tuple[CpuidEntry, ...] | None = None
        self._msr_index_list: tuple[int, ...] | None = None

    def _describe(self) -> str:
        return f"Kvm({self.path})"

    def check_extension(self, cap: Cap | int) -> int:
        """``KVM_CHECK_EXTENSION``: 0 when absent, else a capability-specific value
        (asked of the kernel once per capability: the answer is fixed for the host, but
        for ``XSAVE2``, asked each time)."""
        self._check_open()
        key = int(cap)
        if key == Cap.XSAVE2:  # its size follows the process's XSTATE permissions
            return self._ioctl(ioctls.KVM_CHECK_EXTENSION, key)
        value = self._extensions.get(key)
        if value is None:
            value = self._extensions[key] = self._ioctl(ioctls.KVM_CHECK_EXTENSION, key)
        return value

    @property
    def vcpu_mmap_size(self) -> int:
        """Size of the per-vCPU shared ``kvm_run`` mapping."""
        if self._mmap_size is None:
            self._mmap_size = self._ioctl(ioctls.KVM_GET_VCPU_MMAP_SIZE)
        return self._mmap_size

    @property
    def backend(self) -> str:
        """``"vmx"``, ``"svm"``, ``"pvm"`` or ``"unknown"``."""
        return detect_backend()

    @property
    def backend_meaning(self) -> str:
        """One line on what :attr:`backend` means for guest code."""
        return BACKEND_MEANING[self.backend]

    @property
    def max_vcpus(self) -> int:
        return self.check_extension(Cap.MAX_VCPUS) or self.check_extension(Cap.NR_VCPUS) or 4

    @property
    def recommended_vcpus(self) -> int:
        return self.check_extension(Cap.NR_VCPUS) or 4

    @property
    def max_memory_slots(self) -> int:
        return self.check_extension(Cap.NR_MEMSLOTS) or 32

    def supported_cpuid(self) -> list[CpuidEntry]:
        """``KVM_GET_SUPPORTED_CPUID``: the CPUID leaves KVM can offer a guest (a new
        list each call, of entries asked of the kernel once)."""
        self._check_open()
        if self._supported_cpuid is None:
            self._supported_cpuid = tuple(self._ask_supported_cpuid())
        return list(self._supported_cpuid)

    def _ask_supported_cpuid(self) -> list[CpuidEntry]:
        nent = _MAX_CPUID_ENTRIES
        while True:
            buf = ffi.new("struct kvm_cpuid2 *", {"nent": nent, "entries": nent})
            try:
                self._ioctl(ioctls.KVM_GET_SUPPORTED_CPUID, buf)
            except KvmIoctlError as exc:
                if exc.errno == errno.E2BIG and nent < 4096:
                    nent *= 2
                    continue
                raise
            return [CpuidEntry.from_c(buf.entries[i]) for i in range(buf.nent)]

    def msr_index_list(self) -> list[int]:
        """``KVM_GET_MSR_INDEX_LIST``: MSRs a VMM should save and restore (asked once)."""
        self._check_open()
        if self._msr_index_list is None:
            self._msr_index_list = tuple(self._ask_msr_index_list())
        return list(self._msr_index_list)

    def _ask_msr_index_list(self) -> list[int]:
        probe = ffi.new("struct kvm_msr_list *", {"nmsrs": 0, "indices": 0})
        try:
            self._ioctl(ioctls.KVM_GET_MSR_INDEX_LIST, probe)
        except KvmIoctlError as exc:
            if exc.errno != errno.E2BIG:
                raise
        n = probe.nmsrs
        buf = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
        self._ioctl(ioctls.KVM_GET_MSR_INDEX_LIST, buf)
        return [int(buf.indices[i]) for i in range(buf.nmsrs)]

    def create_vm(self, *, max_memory_slots: int | None = None) -> Vm:
        """``KVM_CREATE_VM``.  ``max_memory_slots`` caps the slots kvmkit hands out
        (default: what the kernel reports)."""
        from kvmkit.kvm.vm import Vm

        fd = self._ioctl(ioctls.KVM_CREATE_VM, 0)
        return Vm(self, fd, max_memory_slots=max_memory_slots)
