"""``Vm``: a VM file descriptor — memory slots, in-kernel devices, vCPU creation."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvmkit._ffi import ffi, lib
from kvmkit.errors import KvmError, KvmIoctlError, MemoryLayoutError
from kvmkit.kvm import ioctls
from kvmkit.kvm._fdobject import FdObject
from kvmkit.kvm.caps import Cap
from kvmkit.kvm.irqroute import IrqchipRoute, Route
from kvmkit.kvm.memory import PAGE_SIZE, GuestAddress, GuestMemory
from kvmkit.kvm.state import IRQCHIP_IDS, StateError, VmState, check_blob

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
        private: bool = False,
    ) -> GuestMemory:
        """Map ``size`` bytes of host memory at guest-physical ``guest_phys``.

        ``backing`` names a file to map (shared) instead of anonymous memory; ``hugepages``
        asks for 2 MiB pages (explicit ones when the host has them free, else transparent).
        ``private`` (with ``backing``) maps the file copy-on-write (``MAP_PRIVATE``): lazy,
        and the guest's writes never reach the file — restore from a snapshot.
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
                private=private,
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

    # ---- complete state, dirty tracking (snapshot, restore, migration) ----------------
    def check_extension(self, cap: Cap | int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd: the VM's own answer (``XSAVE2`` size,
        dirty-ring size, ``SREGS2``); 0 when absent.  Asked each time: ``XSAVE2``'s size
        follows the process's XSTATE permissions, which may grow."""
        return self._ioctl(ioctls.KVM_CHECK_EXTENSION, int(cap))

    def enable_cap(self, cap: Cap | int, *args: int) -> None:
        """``KVM_ENABLE_CAP`` on the VM with up to four arguments."""
        if len(args) > 4:
            raise KvmError(f"KVM_ENABLE_CAP takes at most 4 arguments, not {len(args)}")
        c = ffi.new(
            "struct kvm_enable_cap *", {"cap": int(cap), "args": list(args) + [0] * (4 - len(args))}
        )
        self._ioctl(ioctls.KVM_ENABLE_CAP, c)

    #: Entries of each vCPU's dirty ring, 0 while the ring is off.
    dirty_ring_entries: int = 0

    def enable_dirty_ring(self, entries: int = 65536) -> int:
        """Turn on the per-vCPU dirty ring with ``entries`` entries (a power of two),
        using the acquire/release flavour where offered.  Must precede the first
        ``create_vcpu``; afterwards ``KVM_GET_DIRTY_LOG`` is unavailable on this VM.
        Returns ``entries``."""
        if self._vcpus:
            raise KvmError("the dirty ring must be enabled before any vCPU is created")
        cap = Cap.DIRTY_LOG_RING_ACQ_REL
        max_bytes = self.check_extension(cap)
        if not max_bytes:
            cap = Cap.DIRTY_LOG_RING
            max_bytes = self.check_extension(cap)
        if not max_bytes:
            raise KvmError("this KVM offers no dirty ring (KVM_CAP_DIRTY_LOG_RING)")
        size = entries * ffi.sizeof("struct kvm_dirty_gfn")
        if entries <= 0 or entries & (entries - 1) or size < PAGE_SIZE or size > max_bytes:
            raise KvmError(
                f"dirty ring of {entries} entries is not a power of two between "
                f"{PAGE_SIZE // 16} and {max_bytes // 16}"
            )
        self.enable_cap(cap, size)
        self.dirty_ring_entries = entries
        return entries

    def reset_dirty_rings(self) -> int:
        """``KVM_RESET_DIRTY_RINGS``: re-protect every harvested ring entry; returns how
        many were reset."""
        return self._ioctl(ioctls.KVM_RESET_DIRTY_RINGS)

    def enable_manual_dirty_log_protect(self, *, initially_set: bool = False) -> None:
        """``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``: ``KVM_GET_DIRTY_LOG`` stops clearing
        (and re-protecting) what it reports; :meth:`clear_dirty_log` does it for the
        ranges the caller has copied.  With ``initially_set`` every page starts dirty."""
        offered = self.check_extension(Cap.MANUAL_DIRTY_LOG_PROTECT2)
        flags = lib.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        if initially_set:
            flags |= lib.KVM_DIRTY_LOG_INITIALLY_SET
        if not offered or flags & ~offered:
            raise KvmError(
                f"this KVM offers manual dirty-log protect flags {offered:#x}, not {flags:#x}"
            )
        self.enable_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2, flags)
        self.manual_dirty_protect = True

    manual_dirty_protect: bool = False

    def get_dirty_bitmap(self, region: GuestMemory) -> bytes:
        """``KVM_GET_DIRTY_LOG`` as the raw bitmap: bit *n* (byte n//8, bit n%8) is page
        *n* of the region; length is the page count rounded up to 64 bits, in bytes.
        Decode with :func:`kvmkit.kvm.dirty.iter_dirty_runs`."""
        if not region.log_dirty:
            raise MemoryLayoutError(f"{region!r} was not added with log_dirty=True")
        nbytes = ((region.size // PAGE_SIZE + 63) // 64) * 8
        buf = ffi.new("char[]", nbytes)
        log = ffi.new("struct kvm_dirty_log *", {"slot": region.slot, "dirty_bitmap": buf})
        self._ioctl(ioctls.KVM_GET_DIRTY_LOG, log)
        return bytes(ffi.buffer(buf, nbytes))

    def clear_dirty_log(
        self,
        region: GuestMemory,
        bitmap: bytes,
        *,
        first_page: int = 0,
        num_pages: int | None = None,
    ) -> None:
        """``KVM_CLEAR_DIRTY_LOG`` (needs :meth:`enable_manual_dirty_log_protect`): clear
        and re-protect the pages whose bit is set in ``bitmap``, which covers
        ``num_pages`` pages from ``first_page`` (a multiple of 64)."""
        pages = region.size // PAGE_SIZE
        if num_pages is None:
            num_pages = pages - first_page
        if first_page % 64 or first_page < 0 or num_pages < 0 or first_page + num_pages > pages:
            raise KvmError(
                f"clear_dirty_log range {first_page}+{num_pages} is outside the region's "
                f"{pages} pages or not 64-page aligned"
            )
        if len(bitmap) * 8 < num_pages:
            raise KvmError(f"bitmap of {len(bitmap)} bytes covers fewer than {num_pages} pages")
        buf = ffi.new("char[]", bytes(bitmap))
        c = ffi.new(
            "struct kvm_clear_dirty_log *",
            {
                "slot": region.slot,
                "num_pages": num_pages,
                "first_page": first_page,
                "dirty_bitmap": buf,
            },
        )
        self._ioctl(ioctls.KVM_CLEAR_DIRTY_LOG, c)

    def get_irqchip(self, chip_id: int) -> bytes:
        """``KVM_GET_IRQCHIP``: the raw ``struct kvm_irqchip`` of chip ``chip_id``
        (0 PIC master, 1 PIC slave, 2 IOAPIC)."""
        c = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        self._ioctl(ioctls.KVM_GET_IRQCHIP, c)
        return bytes(ffi.buffer(c))

    def set_irqchip(self, raw: bytes) -> None:
        check_blob("irqchip", raw, ffi.sizeof("struct kvm_irqchip"))
        c = ffi.new("struct kvm_irqchip *")
        ffi.memmove(c, raw, len(raw))
        self._ioctl(ioctls.KVM_SET_IRQCHIP, c)

    def get_pit2(self) -> bytes | None:
        """``KVM_GET_PIT2``: the raw ``struct kvm_pit_state2``; None when the VM has no
        in-kernel PIT."""
        c = ffi.new("struct kvm_pit_state2 *")
        try:
            self._ioctl(ioctls.KVM_GET_PIT2, c)
        except KvmIoctlError as exc:
            if exc.errno in (errno.ENXIO, errno.EINVAL, errno.ENOENT):
                return None
            raise
        return bytes(ffi.buffer(c))

    def set_pit2(self, raw: bytes) -> None:
        check_blob("PIT state", raw, ffi.sizeof("struct kvm_pit_state2"))
        c = ffi.new("struct kvm_pit_state2 *")
        ffi.memmove(c, raw, len(raw))
        self._ioctl(ioctls.KVM_SET_PIT2, c)

    def save_state(self) -> VmState:
        """The VM-wide state: kvmclock, and the irqchip chips and PIT where they exist.
        The caller guarantees no vCPU runs."""
        data = ffi.new("struct kvm_clock_data *")
        self._ioctl(ioctls.KVM_GET_CLOCK, data)
        chips = {}
        if self.has_irqchip:
            chips = {name: self.get_irqchip(cid) for name, cid in IRQCHIP_IDS.items()}
        return VmState(clock_ns=int(data.clock), clock_flags=0, irqchip=chips, pit2=self.get_pit2())

    def restore_state(self, state: VmState) -> None:
        """Write ``state`` back before restoring any vCPU (PIT, clock, then the chips, as
        Firecracker does).  A state with chips or a PIT needs a VM that has them."""
        if state.irqchip and not self.has_irqchip:
            raise StateError("the saved VM has an in-kernel irqchip; create it before restoring")
        for name, raw in state.irqchip.items():
            check_blob(f"irqchip {name}", raw, ffi.sizeof("struct kvm_irqchip"))
        if state.pit2 is not None:
            check_blob("PIT state", state.pit2, ffi.sizeof("struct kvm_pit_state2"))
            if self.get_pit2() is None:
                raise StateError("the saved VM has an in-kernel PIT; create it before restoring")
            self.set_pit2(state.pit2)
        self.set_clock(state.clock_ns)
        for name in IRQCHIP_IDS:
            if name in state.irqchip:
                self.set_irqchip(state.irqchip[name])
