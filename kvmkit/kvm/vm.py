"""``Vm``: a VM file descriptor — memory slots, in-kernel devices, vCPU creation."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvmkit._ffi import ffi, lib
from kvmkit.errors import KvmError, KvmIoctlError, MemoryLayoutError
from kvmkit.kvm import ioctls
from kvmkit.kvm._fdobject import FdObject
from kvmkit.kvm.irqroute import IrqchipRoute, Route
from kvmkit.kvm.memory import PAGE_SIZE, GuestAddress, GuestMemory

if TYPE_CHECKING:
    from kvmkit.kvm.system import Kvm
    from kvmkit.kvm.vcpu import Vcpu

#: Default guest-physical address space kvmkit accepts when CPUID does not say (36 bits).
_DEFAULT_PHYS_BITS = 36


class Vm(FdObject):
    """A VM.  Made by :meth:`Kvm.create_vm`; closing it closes its vCPUs and unmaps its
    memory."""

    def __init__(self, kvm: Kvm, fd: int, *, max_memory_slots: int | None = None) -> None:
        self.kvm = kvm
        self._fd = fd
        self._lock = threading.Lock()
        self._regions: dict[int, GuestMemory] = {}
        self._vcpus: dict[int, Vcpu] = {}
        kernel_slots = kvm.max_memory_slots
        self.max_memory_slots = min(max_memory_slots or kernel_slots, kernel_slots)
        self.has_irqchip = False

    def _describe(self) -> str:
        return f"Vm(fd={self._fd})" if self._fd >= 0 else "Vm(closed)"

    # ---- memory -------------------------------------------------------------------
    @property
    def regions(self) -> list[GuestMemory]:
        """Memory regions, in guest-physical order."""
        return sorted(self._regions.values(), key=lambda r: r.guest_phys)

    def _phys_limit(self) -> int:
        for entry in self.kvm.supported_cpuid():
            if entry.function == 0x80000008:
                return 1 << (entry.eax & 0xFF)
        return 1 << _DEFAULT_PHYS_BITS

    def _validate_region(self, guest_phys: int, size: int) -> None:
        if size <= 0:
            raise MemoryLayoutError(
                f"memory region at {guest_phys:#x} has size {size}; it must be > 0"
            )
        if guest_phys % PAGE_SIZE or size % PAGE_SIZE:
            raise MemoryLayoutError(
                f"memory region {guest_phys:#x}+{size:#x} is not page-aligned",
                hint=f"guest address and size must be multiples of {PAGE_SIZE:#x}",
            )
        if guest_phys < 0 or guest_phys + size > self._phys_limit():
            raise MemoryLayoutError(
                f"memory region {guest_phys:#x}+{size:#x} ends beyond the guest-physical "
                f"address space ({self._phys_limit():#x})"
            )
        host_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if size > host_total:
            raise MemoryLayoutError(
                f"memory region of {size >> 20} MiB is larger than the host's "
                f"{host_total >> 20} MiB of RAM"
            )
        for region in self._regions.values():
            if guest_phys < region.end and region.guest_phys < guest_phys + size:
                raise MemoryLayoutError(
                    f"memory region {guest_phys:#x}-{guest_phys + size - 1:#x} overlaps "
                    f"slot {region.slot} at {int(region.guest_phys):#x}-{int(region.end) - 1:#x}"
                )
        if len(self._regions) >= self.max_memory_slots:
            raise MemoryLayoutError(
                f"no free memory slot: all {self.max_memory_slots} are in use",
                hint="use fewer, larger regions",
            )

    def _free_slot(self) -> int:
        return next(i for i in range(self.max_memory_slots) if i not in self._regions)

    def _set_region(self, region: GuestMemory, size: int) -> None:
        flags = (lib.KVM_MEM_LOG_DIRTY_PAGES if region.log_dirty else 0) | (
            lib.KVM_MEM_READONLY if region.readonly else 0
        )
        desc = ffi.new(
            "struct kvm_userspace_memory_region *",
            {
                "slot": region.slot,
                "flags": flags,
                "guest_phys_addr": region.guest_phys,
                "memory_size": size,
                "userspace_addr": region.host_address,
            },
        )
        self._ioctl(ioctls.KVM_SET_USER_MEMORY_REGION, desc)

    def add_memory(
        self,
        guest_phys: int,
        size: int,
        *,
        readonly: bool = False,
        log_dirty: bool = False,
        backing: str | os.PathLike[str] | None = None,
        hugepages: bool = False,
    ) -> GuestMemory:
        """Map ``size`` bytes of host memory at guest-physical ``guest_phys``.

        ``backing`` names a file to map (shared) instead of anonymous memory; ``hugepages``
        asks for 2 MiB pages (explicit ones when the host has them free, else transparent).
        Raises :class:`MemoryLayoutError` for a zero, misaligned, oversized or
        overlapping region, or when every slot is taken.
        """
        self._check_open()
        with self._lock:
            self._validate_region(int(guest_phys), int(size))
            region = GuestMemory(
                guest_phys,
                size,
                slot=self._free_slot(),
                readonly=readonly,
                log_dirty=log_dirty,
                backing=backing,
                hugepages=hugepages,
            )
            try:
                self._set_region(region, size)
            except KvmIoctlError:
                region.close()
                raise
            self._regions[region.slot] = region
            return region

    def remove_memory(self, region: GuestMemory) -> None:
        """Remove ``region`` from the guest and unmap it.  Its slot becomes free."""
        self._check_open()
        with self._lock:
            if self._regions.get(region.slot) is not region:
                raise MemoryLayoutError(f"{region!r} does not belong to this VM (already removed?)")
            self._set_region(region, 0)
            del self._regions[region.slot]
            region.close()

    def region_for(self, addr: int, length: int = 1) -> GuestMemory:
        """The region holding ``[addr, addr+length)``; raises if none holds all of it."""
        for region in self._regions.values():
            if region.contains(addr, length):
                return region
        from kvmkit.errors import GuestMemoryAccessError

        raise GuestMemoryAccessError(f"no guest memory holds {length} bytes at {int(addr):#x}")

    def read(self, addr: int, length: int) -> bytes:
        return self.region_for(addr, length).read(addr, length)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self.region_for(addr, len(data)).write(addr, data)

    def get_dirty_log(self, region: GuestMemory) -> list[GuestAddress]:
        """``KVM_GET_DIRTY_LOG``: guest-physical addresses of the pages written since the
        last call (the kernel clears the log as it reports it).  The region must have been
        added with ``log_dirty=True``."""
        if not region.log_dirty:
            raise MemoryLayoutError(f"{region!r} was not added with log_dirty=True")
        pages = region.size // PAGE_SIZE
        words = (pages + 63) // 64
        bitmap = ffi.new("uint64_t[]", max(words, 1))
        log = ffi.new("struct kvm_dirty_log *", {"slot": region.slot, "dirty_bitmap": bitmap})
        self._ioctl(ioctls.KVM_GET_DIRTY_LOG, log)
        dirty = []
        for w in range(words):
            word = bitmap[w]
            while word:
                low = word & -word
                bit = low.bit_length() - 1
                dirty.append(GuestAddress(region.guest_phys + (w * 64 + bit) * PAGE_SIZE))
                word ^= low
        return dirty

    # ---- in-kernel devices and x86 setup ---------------------------------------------
    def create_irqchip(self) -> None:
        """``KVM_CREATE_IRQCHIP``: in-kernel PIC, IOAPIC and per-vCPU LAPIC.  Call before
        creating vCPUs."""
        self._ioctl(ioctls.KVM_CREATE_IRQCHIP)
        self.has_irqchip = True

    def create_pit2(self, *, speaker_dummy: bool = True) -> None:
        """``KVM_CREATE_PIT2``: in-kernel i8254 (needs the irqchip)."""
        cfg = ffi.new(
            "struct kvm_pit_config *", {"flags": lib.KVM_PIT_SPEAKER_DUMMY if speaker_dummy else 0}
        )
        self._ioctl(ioctls.KVM_CREATE_PIT2, cfg)

    def set_tss_addr(self, addr: int) -> None:
        """``KVM_SET_TSS_ADDR``: three pages of guest-physical space VMX needs for real mode;
        must not overlap guest memory (kvmtool and QEMU use 0xfffbd000)."""
        self._ioctl(ioctls.KVM_SET_TSS_ADDR, int(addr))

    def set_identity_map_addr(self, addr: int) -> None:
        """``KVM_SET_IDENTITY_MAP_ADDR``: one page for VMX's real-mode identity map."""
        value = ffi.new("__u64 *", int(addr))
        self._ioctl(ioctls.KVM_SET_IDENTITY_MAP_ADDR, value)

    def irq_line(self, irq: int, level: bool) -> None:
        """``KVM_IRQ_LINE``: raise or lower a GSI on the in-kernel irqchip."""
        arg = ffi.new("struct kvm_irq_level *", {"irq": irq, "level": 1 if level else 0})
        self._ioctl(ioctls.KVM_IRQ_LINE, arg)

    # ---- interrupts: MSI, GSI routing, irqfd, ioeventfd --------------------------------
    def signal_msi(self, address: int, data: int) -> bool:
        """``KVM_SIGNAL_MSI``: inject one MSI (needs the irqchip).  True if it was
        delivered, False if the guest blocked it (e.g. a masked or disabled LAPIC)."""
        msi = ffi.new(
            "struct kvm_msi *",
            {"address_lo": address & 0xFFFFFFFF, "address_hi": address >> 32, "data": data},
        )
        return bool(self._ioctl(ioctls.KVM_SIGNAL_MSI, msi) > 0)

    def set_gsi_routing(self, routes: Sequence[Route]) -> None:
        """``KVM_SET_GSI_ROUTING``: replace the whole GSI table with ``routes``
        (start from :func:`kvmkit.kvm.irqroute.default_routes` to keep the PIC/IOAPIC
        lines).  A GSI may appear more than once (it then drives every target)."""
        n = len(routes)
        table = ffi.new("struct kvm_irq_routing *", {"nr": n, "entries": max(n, 1)})
        table.nr = n
        for i, route in enumerate(routes):
            entry = table.entries[i]
            entry.gsi = route.gsi
            if isinstance(route, IrqchipRoute):
                entry.type = lib.KVM_IRQ_ROUTING_IRQCHIP
                entry.u.irqchip.irqchip = route.irqchip
                entry.u.irqchip.pin = route.pin
            else:
                entry.type = lib.KVM_IRQ_ROUTING_MSI
                entry.u.msi.address_lo = route.address & 0xFFFFFFFF
                entry.u.msi.address_hi = route.address >> 32
                entry.u.msi.data = route.data
        self._ioctl(ioctls.KVM_SET_GSI_ROUTING, table)

    def irqfd(self, eventfd: int, gsi: int, *, deassign: bool = False) -> None:
        """``KVM_IRQFD``: a write to ``eventfd`` raises (edge) GSI ``gsi`` in the kernel,
        with no exit and no Python.  ``deassign=True`` removes the binding.  The caller
        owns ``eventfd`` and keeps it open while bound."""
        arg = ffi.new(
            "struct kvm_irqfd *",
            {"fd": eventfd, "gsi": gsi, "flags": lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0},
        )
        self._ioctl(ioctls.KVM_IRQFD, arg)

    def ioeventfd(
        self,
        eventfd: int,
        addr: int,
        length: int,
        datamatch: int | None = None,
        *,
        pio: bool = True,
        deassign: bool = False,
    ) -> None:
        """``KVM_IOEVENTFD``: a guest write of ``length`` bytes (1, 2, 4, 8; 0 = any) to
        port (``pio``) or MMIO address ``addr`` — equal to ``datamatch`` when given —
        signals ``eventfd`` and resumes the guest at once: no exit to user space.  Give the
        same arguments with ``deassign=True`` to remove it."""
        if length not in (0, 1, 2, 4, 8):
            raise KvmError(f"ioeventfd length {length}: give 0, 1, 2, 4 or 8 bytes")
        flags = (
            (lib.KVM_IOEVENTFD_FLAG_PIO if pio else 0)
            | (lib.KVM_IOEVENTFD_FLAG_DATAMATCH if datamatch is not None else 0)
            | (lib.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        )
        arg = ffi.new(
            "struct kvm_ioeventfd *",
            {
                "datamatch": datamatch or 0,
                "addr": addr,
                "len": length,
                "fd": eventfd,
                "flags": flags,
            },
        )
        self._ioctl(ioctls.KVM_IOEVENTFD, arg)

    def get_clock(self) -> int:
        """``KVM_GET_CLOCK``: the VM's kvmclock in nanoseconds."""
        data = ffi.new("struct kvm_clock_data *")
        self._ioctl(ioctls.KVM_GET_CLOCK, data)
        return int(data.clock)

    def set_clock(self, ns: int) -> None:
        data = ffi.new("struct kvm_clock_data *", {"clock": ns})
        self._ioctl(ioctls.KVM_SET_CLOCK, data)

    # ---- vCPUs ----------------------------------------------------------------------
    def create_vcpu(self, index: int) -> Vcpu:
        """``KVM_CREATE_VCPU`` with vCPU id ``index`` and map its ``kvm_run`` page."""
        from kvmkit.kvm.vcpu import Vcpu

        self._check_open()
        if index in self._vcpus and not self._vcpus[index].closed:
            raise KvmError(f"vCPU {index} already exists in this VM")
        fd = self._ioctl(ioctls.KVM_CREATE_VCPU, index)
        vcpu = Vcpu(self, fd, index)
        self._vcpus[index] = vcpu
        return vcpu

    @property
    def vcpus(self) -> list[Vcpu]:
        return [v for _, v in sorted(self._vcpus.items()) if not v.closed]

    def _release(self) -> None:
        for vcpu in list(self._vcpus.values()):
            vcpu.close()
        self._vcpus.clear()
        for region in list(self._regions.values()):
            region.close()
        self._regions.clear()
