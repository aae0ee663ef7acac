"""``Vcpu``: a vCPU file descriptor — register state, debug control and ``run()``."""

from __future__ import annotations

import contextlib
import errno
import mmap
import signal
import struct
import threading
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from kvmkit._ffi import ffi, lib
from kvmkit.errors import KvmError, KvmIoctlError
from kvmkit.kvm import exits, ioctls
from kvmkit.kvm._fdobject import FdObject
from kvmkit.kvm.caps import Cap
from kvmkit.kvm.cpuid import CpuidEntry
from kvmkit.kvm.dirty import DirtyRing
from kvmkit.kvm.state import (
    DEFERRED_MSRS,
    REG_NAMES,
    StateError,
    VcpuState,
    check_blob,
)

if TYPE_CHECKING:
    from kvmkit.kvm.vm import Vm

_kick_handler_lock = threading.Lock()
_kick_handler_installed = False
KICK_SIGNAL: int = lib.kvmkit_kick_signal()


def _install_kick_handler() -> None:
    global _kick_handler_installed
    with _kick_handler_lock:
        if not _kick_handler_installed:
            if lib.kvmkit_install_kick_handler() != 0:
                raise KvmError(
                    f"cannot install the vCPU kick signal handler (signal {KICK_SIGNAL})"
                )
            _kick_handler_installed = True


@dataclass
class Regs:
    """General-purpose registers (``struct kvm_regs``)."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2

    def format(self) -> str:
        """A compact multi-line dump, four registers a line."""
        names = [f.name for f in fields(self)]
        parts = [f"{n}={getattr(self, n):#018x}" for n in names]
        return "\n".join("  ".join(parts[i : i + 4]) for i in range(0, len(parts), 4))


#: RFLAGS.TF, used to single-step without KVM's help when needed.
RFLAGS_TF = 1 << 8


class Vcpu(FdObject):
    """A vCPU.  Made by :meth:`Vm.create_vcpu`.

    :meth:`run` must only be called from one thread at a time; :meth:`kick` may be
    called from any thread.
    """

    def __init__(self, vm: Vm, fd: int, index: int) -> None:
        self.vm = vm
        self._fd = fd
        self.index = index
        _install_kick_handler()
        size = vm.kvm.vcpu_mmap_size
        self._run_map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._run_ptr = ffi.from_buffer("struct kvm_run *", self._run_map)
        self._running_thread: int | None = None
        self._io_data_offset = 0
        self._io_len = 0
        self._readable: dict[tuple[int, ...], list[int]] = {}  # readable_msrs' answers

    def _describe(self) -> str:
        return f"Vcpu({self.index})"

    @property
    def kvm_run(self) -> Any:
        """The shared ``struct kvm_run`` (a cdata).  Valid until :meth:`close`."""
        self._check_open()
        return self._run_ptr

    @property
    def run_page(self) -> mmap.mmap:
        """The shared ``kvm_run`` mapping (for the C fast path).  Valid until close."""
        self._check_open()
        return self._run_map

    def _release(self) -> None:
        ring = getattr(self, "_dirty_ring", None)
        if ring is not None:
            ring.close()
        ffi.release(self._run_ptr)
        self._run_map.close()

    # ---- registers -----------------------------------------------------------------
    def get_regs(self) -> Regs:
        c = ffi.new("struct kvm_regs *")
        self._ioctl(ioctls.KVM_GET_REGS, c)
        return Regs(**{n: getattr(c, n) for n in REG_NAMES})

    def set_regs(self, regs: Regs) -> None:
        c = ffi.new("struct kvm_regs *", {n: getattr(regs, n) for n in REG_NAMES})
        self._ioctl(ioctls.KVM_SET_REGS, c)

    def get_sregs(self) -> Any:
        """``KVM_GET_SREGS`` as a ``struct kvm_sregs`` cdata: change fields, pass it back
        to :meth:`set_sregs`."""
        c = ffi.new("struct kvm_sregs *")
        self._ioctl(ioctls.KVM_GET_SREGS, c)
        return c

    def set_sregs(self, sregs: Any) -> None:
        self._ioctl(ioctls.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> Any:
        c = ffi.new("struct kvm_fpu *")
        self._ioctl(ioctls.KVM_GET_FPU, c)
        return c

    def set_fpu(self, fpu: Any) -> None:
        self._ioctl(ioctls.KVM_SET_FPU, fpu)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """``KVM_GET_MSRS``: values of the MSRs named by ``indices``.  Raises if KVM
        returns fewer than asked (an unsupported MSR)."""
        n = len(indices)
        c = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": n})
        for i, index in enumerate(indices):
            c.entries[i].index = index
        got = self._ioctl(ioctls.KVM_GET_MSRS, c)
        if got != n:
            raise KvmError(
                f"KVM_GET_MSRS on {self._describe()} read {got} of {n} MSRs; MSR {indices[got]:#x} is not supported"
            )
        return {int(c.entries[i].index): int(c.entries[i].data) for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> None:
        n = len(values)
        c = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": n})
        for i, (index, data) in enumerate(values.items()):
            c.entries[i].index = index
            c.entries[i].data = data
        done = self._ioctl(ioctls.KVM_SET_MSRS, c)
        if done != n:
            bad = list(values)[done]
            raise KvmError(
                f"KVM_SET_MSRS on {self._describe()} set {done} of {n} MSRs; MSR {bad:#x} was refused"
            )

    def set_cpuid2(self, entries: list[CpuidEntry]) -> None:
        n = len(entries)
        c = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
        for i, e in enumerate(entries):
            e.to_c(c.entries[i])
        self._ioctl(ioctls.KVM_SET_CPUID2, c)
        self._readable.clear()  # which MSRs exist follows CPUID

    def get_cpuid2(self) -> list[CpuidEntry]:
        n = 256
        c = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
        self._ioctl(ioctls.KVM_GET_CPUID2, c)
        return [CpuidEntry.from_c(c.entries[i]) for i in range(c.nent)]

    def get_lapic(self) -> bytes:
        """``KVM_GET_LAPIC``: the 1 KiB local APIC register page."""
        c = ffi.new("struct kvm_lapic_state *")
        self._ioctl(ioctls.KVM_GET_LAPIC, c)
        return bytes(ffi.buffer(c.regs))

    def set_lapic(self, regs: bytes) -> None:
        c = ffi.new("struct kvm_lapic_state *")
        ffi.memmove(c.regs, regs, min(len(regs), ffi.sizeof(c.regs)))
        self._ioctl(ioctls.KVM_SET_LAPIC, c)

    def get_vcpu_events(self) -> Any:
        c = ffi.new("struct kvm_vcpu_events *")
        self._ioctl(ioctls.KVM_GET_VCPU_EVENTS, c)
        return c

    def set_vcpu_events(self, events: Any) -> None:
        self._ioctl(ioctls.KVM_SET_VCPU_EVENTS, events)

    def get_mp_state(self) -> int:
        c = ffi.new("struct kvm_mp_state *")
        self._ioctl(ioctls.KVM_GET_MP_STATE, c)
        return int(c.mp_state)

    def set_mp_state(self, state: int) -> None:
        c = ffi.new("struct kvm_mp_state *", {"mp_state": state})
        self._ioctl(ioctls.KVM_SET_MP_STATE, c)

    def set_guest_debug(self, *, single_step: bool = False, enable: bool = True) -> None:
        """``KVM_SET_GUEST_DEBUG``: with ``single_step``, each instruction ends in a
        :class:`~kvmkit.kvm.exits.Debug` exit.  ``enable=False`` turns debugging off."""
        control = 0
        if enable:
            control = lib.KVM_GUESTDBG_ENABLE | (lib.KVM_GUESTDBG_SINGLESTEP if single_step else 0)
        c = ffi.new("struct kvm_guest_debug *", {"control": control})
        self._ioctl(ioctls.KVM_SET_GUEST_DEBUG, c)

    # ---- complete state (snapshot, restore, migration) ------------------------------
    # Every call here must be made while this vCPU is not in KVM_RUN (kvmkit.kvm.state
    # has the order and why).

    def get_sregs2(self) -> Any:
        """``KVM_GET_SREGS2`` (``KVM_CAP_SREGS2``): sregs with the PAE PDPTRs."""
        c = ffi.new("struct kvm_sregs2 *")
        self._ioctl(ioctls.KVM_GET_SREGS2, c)
        return c

    def set_sregs2(self, sregs2: Any) -> None:
        self._ioctl(ioctls.KVM_SET_SREGS2, sregs2)

    def xsave_size(self) -> int:
        """Bytes of ``struct kvm_xsave`` KVM reads and writes (``KVM_CAP_XSAVE2``'s
        value where offered, else 4096); 0 without ``KVM_CAP_XSAVE``."""
        vm = self.vm
        if not vm.kvm.check_extension(Cap.XSAVE):
            return 0
        return max(int(vm.check_extension(Cap.XSAVE2)), int(ffi.sizeof("struct kvm_xsave")))

    def get_xsave(self) -> bytes:
        """``KVM_GET_XSAVE2`` (``KVM_GET_XSAVE`` without ``KVM_CAP_XSAVE2``): the
        XSAVE area, :meth:`xsave_size` bytes."""
        size = self.xsave_size()
        buf = ffi.new("char[]", size)
        request = (
            ioctls.KVM_GET_XSAVE2 if self.vm.check_extension(Cap.XSAVE2) else ioctls.KVM_GET_XSAVE
        )
        self._ioctl(request, ffi.cast("struct kvm_xsave *", buf))
        return bytes(ffi.buffer(buf, size))

    def set_xsave(self, area: bytes) -> None:
        check_blob("XSAVE area", area, self.xsave_size())
        buf = ffi.new("char[]", area)
        self._ioctl(ioctls.KVM_SET_XSAVE, ffi.cast("struct kvm_xsave *", buf))

    def get_xcrs(self) -> Any:
        c = ffi.new("struct kvm_xcrs *")
        self._ioctl(ioctls.KVM_GET_XCRS, c)
        return c

    def set_xcrs(self, xcrs: Any) -> None:
        self._ioctl(ioctls.KVM_SET_XCRS, xcrs)

    def get_debugregs(self) -> Any:
        c = ffi.new("struct kvm_debugregs *")
        self._ioctl(ioctls.KVM_GET_DEBUGREGS, c)
        return c

    def set_debugregs(self, regs: Any) -> None:
        self._ioctl(ioctls.KVM_SET_DEBUGREGS, regs)

    def get_tsc_khz(self) -> int:
        """``KVM_GET_TSC_KHZ``: the guest TSC frequency."""
        return self._ioctl(ioctls.KVM_GET_TSC_KHZ)

    def kvmclock_ctrl(self) -> bool:
        """``KVM_KVMCLOCK_CTRL``: tell a kvmclock guest it was paused (no soft-lockup
        warning).  False when the guest has not enabled kvmclock (EINVAL)."""
        try:
            self._ioctl(ioctls.KVM_KVMCLOCK_CTRL)
        except KvmIoctlError as exc:
            if exc.errno == errno.EINVAL:
                return False
            raise
        return True

    def readable_msrs(self, indices: list[int]) -> list[int]:
        """The MSRs of ``indices`` that ``KVM_GET_MSRS`` can read on this vCPU, in order.

        ``KVM_GET_MSR_INDEX_LIST`` names MSRs that exist on the host; some of them this
        guest's CPUID does not have.  ``KVM_GET_MSRS`` stops at the first it cannot read
        and returns how many it read: drop that one and go on, as QEMU only asks for the
        MSRs its probe found readable.  The answer is kept until :meth:`set_cpuid2`."""
        key = tuple(indices)
        if key not in self._readable:
            self._readable[key] = self._probe_msrs(list(indices))
        return list(self._readable[key])

    def _probe_msrs(self, indices: list[int]) -> list[int]:
        out: list[int] = []
        rest = indices
        while rest:
            n = len(rest)
            c = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": n})
            for i, index in enumerate(rest):
                c.entries[i].index = index
            got = self._ioctl(ioctls.KVM_GET_MSRS, c)
            out.extend(rest[:got])
            rest = rest[got + 1 :]
        return out

    def complete_pending_io(self) -> None:
        """``KVM_RUN`` with ``immediate_exit`` set: KVM finishes an ``in``/MMIO read whose
        reply user space already wrote into ``kvm_run`` (or an ``out`` it still holds),
        then returns without entering the guest.  Without this, state saved after an
        I/O exit would lose the rest of that instruction (Firecracker does the same)."""
        run = self._run_ptr
        run.immediate_exit = 1
        try:
            rc = _kvm_run(self.fd)
        finally:
            run.immediate_exit = 0
        if rc < 0 and -rc not in (errno.EINTR, errno.EAGAIN):
            raise KvmIoctlError("KVM_RUN", -rc, self._describe())

    def save_state(self, msr_indices: list[int] | None = None) -> VcpuState:
        """Read this vCPU's complete state (order in :mod:`kvmkit.kvm.state`).

        ``msr_indices`` defaults to ``KVM_GET_MSR_INDEX_LIST`` filtered by
        :meth:`readable_msrs`.  The caller guarantees no thread runs this vCPU (and, for
        a consistent VM, that no vCPU of the VM runs).
        """
        kvm = self.vm.kvm
        self.complete_pending_io()
        mp_state = self.get_mp_state()
        regs = self.get_regs()
        if self.vm.check_extension(Cap.SREGS2):
            kind, sregs = "sregs2", self.get_sregs2()
        else:
            kind, sregs = "sregs", self.get_sregs()
        xsave = self.get_xsave() if self.xsave_size() else b""
        fpu = b"" if xsave else bytes(ffi.buffer(self.get_fpu()))
        xcrs = bytes(ffi.buffer(self.get_xcrs())) if kvm.check_extension(Cap.XCRS) else b""
        dregs = bytes(ffi.buffer(self.get_debugregs()))
        lapic = self.get_lapic() if self.vm.has_irqchip else None
        tsc_khz = self.get_tsc_khz() if kvm.check_extension(Cap.GET_TSC_KHZ) else None
        if msr_indices is None:
            msr_indices = self.readable_msrs(kvm.msr_index_list())
        order = [i for i in msr_indices if i not in DEFERRED_MSRS]
        order += [i for i in msr_indices if i in DEFERRED_MSRS]
        msrs = self.get_msrs(order) if order else {}
        events = bytes(ffi.buffer(self.get_vcpu_events()))
        return VcpuState(
            index=self.index,
            mp_state=mp_state,
            regs={n: getattr(regs, n) for n in REG_NAMES},
            sregs_kind=kind,
            sregs=bytes(ffi.buffer(sregs)),
            xsave=xsave,
            fpu=fpu,
            xcrs=xcrs,
            debugregs=dregs,
            events=events,
            msrs=msrs,
            lapic=lapic,
            tsc_khz=tsc_khz,
            cpuid=self.get_cpuid2(),
        )

    def restore_state(self, state: VcpuState) -> None:
        """Write ``state`` back (order in :mod:`kvmkit.kvm.state`).  Every blob is checked
        against this host's structure size first (:class:`StateError`), so nothing is
        written from a state that does not fit.  The VM state (irqchip, PIT, clock) must
        be restored before the first vCPU's."""
        kind = "struct kvm_sregs2" if state.sregs_kind == "sregs2" else "struct kvm_sregs"
        check_blob(state.sregs_kind, state.sregs, ffi.sizeof(kind))
        if state.xsave:
            check_blob("XSAVE area", state.xsave, self.xsave_size())
        else:
            check_blob("FPU state", state.fpu, ffi.sizeof("struct kvm_fpu"))
        if state.xcrs:
            check_blob("XCRs", state.xcrs, ffi.sizeof("struct kvm_xcrs"))
        check_blob("debug registers", state.debugregs, ffi.sizeof("struct kvm_debugregs"))
        check_blob("vCPU events", state.events, ffi.sizeof("struct kvm_vcpu_events"))
        if state.lapic is not None:
            if not self.vm.has_irqchip:
                raise StateError("the saved vCPU has a LAPIC; this VM has no in-kernel irqchip")
            check_blob("LAPIC", state.lapic, ffi.sizeof("struct kvm_lapic_state"))
        if state.sregs_kind == "sregs2" and not self.vm.check_extension(Cap.SREGS2):
            raise StateError("the state holds sregs2 and this host has no KVM_CAP_SREGS2")

        if state.cpuid:
            self.set_cpuid2(state.cpuid)
        self.set_mp_state(state.mp_state)
        self.set_regs(Regs(**state.regs))
        sregs = ffi.new(kind + " *")
        ffi.memmove(sregs, state.sregs, len(state.sregs))
        if state.sregs_kind == "sregs2":
            self.set_sregs2(sregs)
        else:
            self.set_sregs(sregs)
        if state.xsave:
            self.set_xsave(state.xsave)
        else:
            fpu = ffi.new("struct kvm_fpu *")
            ffi.memmove(fpu, state.fpu, len(state.fpu))
            self.set_fpu(fpu)
        if state.xcrs:
            xcrs = ffi.new("struct kvm_xcrs *")
            ffi.memmove(xcrs, state.xcrs, len(state.xcrs))
            self.set_xcrs(xcrs)
        dregs = ffi.new("struct kvm_debugregs *")
        ffi.memmove(dregs, state.debugregs, len(state.debugregs))
        self.set_debugregs(dregs)
        if state.lapic is not None:
            self.set_lapic(state.lapic)
        if state.msrs:
            self._restore_msrs(state.msrs)
        events = ffi.new("struct kvm_vcpu_events *")
        ffi.memmove(events, state.events, len(state.events))
        self.set_vcpu_events(events)

    def _restore_msrs(self, msrs: dict[int, int]) -> None:
        """``KVM_SET_MSRS`` in order.  KVM stops at an MSR it refuses (some paravirtual
        MSRs refuse even a host write of their reset value): such an MSR is accepted only
        when it already holds the saved value here, else :class:`StateError`."""
        items = list(msrs.items())
        while items:
            n = len(items)
            c = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": n})
            for i, (index, data) in enumerate(items):
                c.entries[i].index = index
                c.entries[i].data = data
            done = self._ioctl(ioctls.KVM_SET_MSRS, c)
            if done == n:
                return
            index, want = items[done]
            try:
                have = self.get_msrs([index])[index]
            except KvmError:
                have = None
            if have != want:
                raise StateError(
                    f"KVM refuses MSR {index:#x} = {want:#x} on {self._describe()}",
                    hint="the snapshot needs a guest CPU this host cannot give",
                )
            items = items[done + 1 :]

    # ---- dirty ring (KVM_CAP_DIRTY_LOG_RING) -------------------------------------------
    def dirty_ring(self) -> DirtyRing:
        """Return this vCPU's dirty ring, mapped on first use.  The VM must have enabled the ring
        (:meth:`Vm.enable_dirty_ring`) before this vCPU was created."""
        self._check_open()
        ring = getattr(self, "_dirty_ring", None)
        if ring is None:
            entries = self.vm.dirty_ring_entries
            if not entries:
                raise KvmError(
                    f"{self._describe()} has no dirty ring",
                    hint="call vm.enable_dirty_ring() before creating vCPUs",
                )
            ring = DirtyRing(self.fd, entries)
            self._dirty_ring = ring
        return ring

    # ---- running -----------------------------------------------------------------
    def run(self) -> exits.VcpuExit:
        """``KVM_RUN`` until the next exit to user space, returned as a typed exit.

        The GIL is released while the guest runs.  ``IoIn``/``MmioRead`` exits must be
        answered (``exit.reply(data)``) before the next call.  A :meth:`kick` from
        another thread, or any signal, makes it return :class:`~kvmkit.kvm.exits.Interrupted`.
        """
        if self._fd < 0:
            self._check_open()
        self._running_thread = threading.get_ident()
        rc = _kvm_run(self._fd)
        self._running_thread = None
        if rc < 0:
            return self.interrupted_or_raise(-rc)
        return self.decode_exit()

    def interrupted_or_raise(self, err: int) -> exits.VcpuExit:
        """What a ``KVM_RUN`` that failed with ``err`` means: ``Interrupted`` for a kick
        or signal (and ``immediate_exit`` is reset), else :class:`KvmIoctlError`."""
        if err in (errno.EINTR, errno.EAGAIN):
            self._run_ptr.immediate_exit = 0
            return exits.INTERRUPTED
        raise KvmIoctlError("KVM_RUN", err, self._describe())

    def decode_exit(self) -> exits.VcpuExit:
        """The typed exit described by the ``kvm_run`` page right now (after a
        ``KVM_RUN`` that returned 0, e.g. one issued by the C fast path)."""
        # The hot exits are decoded with struct from the shared page (one call each):
        # field by field through cffi costs several times more per exit.
        page = self._run_map
        reason = _REASON.unpack_from(page, _REASON_AT)[0]
        if reason == _EXIT_IO:
            direction, size, port, count, off = _IO.unpack_from(page, _IO_AT)
            if direction == _IO_OUT:
                return exits.IoOut(port, size, page[off : off + size * count], count)
            self._io_data_offset = off
            self._io_len = size * count
            return exits.IoIn(port, size, count, self)
        if reason == _EXIT_MMIO:
            addr, length, is_write = _MMIO.unpack_from(page, _MMIO_AT)
            if is_write:
                return exits.MmioWrite(addr, page[_MMIO_DATA : _MMIO_DATA + length])
            return exits.MmioRead(addr, length, self)
        run = self._run_ptr
        return self._decode_rare(run, reason)

    def _decode_rare(self, run: Any, reason: int) -> exits.VcpuExit:
        if reason == lib.KVM_EXIT_HLT:
            return exits.HLT
        if reason == lib.KVM_EXIT_SHUTDOWN:
            return exits.SHUTDOWN
        if reason == lib.KVM_EXIT_DEBUG:
            arch = run.debug.arch
            return exits.Debug(arch.pc, arch.exception, arch.dr6, arch.dr7)
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            fe = run.fail_entry
            return exits.FailEntry(fe.hardware_entry_failure_reason, fe.cpu)
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            internal = run.internal
            n = min(internal.ndata, 16)
            return exits.InternalError(internal.suberror, tuple(internal.data[i] for i in range(n)))
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            ev = run.system_event
            n = min(ev.ndata, 16)
            return exits.SystemEvent(ev.type, tuple(ev.data[i] for i in range(n)))
        if reason == lib.KVM_EXIT_INTR:
            return exits.INTERRUPTED
        if reason == lib.KVM_EXIT_IRQ_WINDOW_OPEN:
            return exits.IRQ_WINDOW_OPEN
        return exits.UnknownExit(reason, run.hw.hardware_exit_reason)

    def _reply_io_in(self, data: bytes) -> None:
        self._check_open()
        if len(data) != self._io_len:
            raise KvmError(f"IoIn reply has {len(data)} bytes; the guest reads {self._io_len}")
        off = self._io_data_offset
        self._run_map[off : off + len(data)] = data

    def _reply_mmio_read(self, data: bytes) -> None:
        self._check_open()
        mmio = self._run_ptr.mmio
        if len(data) != mmio.len:
            raise KvmError(f"MmioRead reply has {len(data)} bytes; the guest reads {mmio.len}")
        ffi.memmove(mmio.data, data, len(data))

    def bind_thread(self, thread_ident: int | None) -> None:
        """Tell :meth:`kick` which thread to signal while code other than :meth:`run`
        (the runner's C fast path) issues ``KVM_RUN`` on this vCPU; ``None`` when it
        stops."""
        self._running_thread = thread_ident

    def kick(self) -> None:
        """Make a :meth:`run` in progress (or the next one) return ``Interrupted``.

        Safe from any thread: sets ``kvm_run.immediate_exit`` and signals the thread in
        ``KVM_RUN``, as kvmtool and Firecracker do.  ``immediate_exit`` closes the race
        where the signal arrives just before the thread enters the kernel.
        """
        self._check_open()
        self._run_ptr.immediate_exit = 1
        thread = self._running_thread
        if thread is not None:
            # The thread may have left run() meanwhile; immediate_exit still holds.
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pthread_kill(thread, KICK_SIGNAL)

    def __repr__(self) -> str:
        return f"<Vcpu {self.index}{' closed' if self.closed else ''}>"


_kvm_run = lib.kvmkit_kvm_run  # KVM_RUN returning -errno (csrc/kvm_helpers.c)
_EXIT_IO = lib.KVM_EXIT_IO
_EXIT_MMIO = lib.KVM_EXIT_MMIO
_IO_OUT = lib.KVM_EXIT_IO_OUT
_MMIO_DATA = ffi.offsetof("struct kvm_run", "mmio") + ffi.offsetof("kvmkit_run_mmio", "data")


def _layout(ctype: str, fields: list[tuple[str, str]]) -> tuple[int, struct.Struct]:
    """A struct.Struct reading ``fields`` (name, format char) of the exit-union member
    ``ctype`` at the offsets the compiler gave them; returns (offset in kvm_run, Struct)."""
    base = ffi.offsetof("struct kvm_run", ctype)
    member = {"io": "kvmkit_run_io", "mmio": "kvmkit_run_mmio"}[ctype]
    fmt, pos = "<", 0
    for name, code in fields:
        off = ffi.offsetof(member, name)
        fmt += f"{off - pos}x" if off > pos else ""
        fmt += code
        pos = off + struct.calcsize("<" + code)
    return base, struct.Struct(fmt)


_REASON_AT = ffi.offsetof("struct kvm_run", "exit_reason")
_REASON = struct.Struct("<I")
_IO_AT, _IO = _layout(
    "io", [("direction", "B"), ("size", "B"), ("port", "H"), ("count", "I"), ("data_offset", "Q")]
)
_MMIO_AT, _MMIO = _layout("mmio", [("phys_addr", "Q"), ("len", "I"), ("is_write", "B")])
