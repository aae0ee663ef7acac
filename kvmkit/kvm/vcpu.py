"""``Vcpu``: a vCPU file descriptor — register state, debug control and ``run()``."""

from __future__ import annotations

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
from kvmkit.kvm.cpuid import CpuidEntry

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


_REG_NAMES = [f.name for f in fields(Regs)]

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
        ffi.release(self._run_ptr)
        self._run_map.close()

    # ---- registers -----------------------------------------------------------------
    def get_regs(self) -> Regs:
        c = ffi.new("struct kvm_regs *")
        self._ioctl(ioctls.KVM_GET_REGS, c)
        return Regs(*(getattr(c, n) for n in _REG_NAMES))

    def set_regs(self, regs: Regs) -> None:
        c = ffi.new("struct kvm_regs *", {n: getattr(regs, n) for n in _REG_NAMES})
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
            try:
                signal.pthread_kill(thread, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass  # the thread left run() meanwhile; immediate_exit still holds

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
