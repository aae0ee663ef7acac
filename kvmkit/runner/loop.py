"""The two run loops of one vCPU: a Python loop that dispatches every exit, and the C fast
path (``csrc/fastpath.c``) that handles the console, exit and mark ports itself and comes
back to Python only for the rest.  Both produce the same console output and statistics.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kvmkit._ffi import ffi, lib
from kvmkit.errors import KvmIoctlError, KvmkitError
from kvmkit.kvm import Vcpu
from kvmkit.kvm.exits import (
    Debug,
    FailEntry,
    Hlt,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Shutdown,
    SystemEvent,
    VcpuExit,
    exit_name,
)
from kvmkit.runner.bus import Bus
from kvmkit.runner.context import GuestExit, RunContext
from kvmkit.runner.devices.debugcon import DEBUGCON_PORT
from kvmkit.runner.devices.debugexit import DEBUG_EXIT_PORT
from kvmkit.runner.devices.hypercalls import HC_EXIT, HC_MARK, HYPERCALL_BASE
from kvmkit.runner.errors import BusError
from kvmkit.runner.stats import KINDS, VcpuStats


@dataclass
class Outcome:
    """How one vCPU's loop ended.

    ``kind``: ``exit`` (the guest asked, ``code`` set), ``halt`` (HLT with no irqchip),
    ``stopped`` (another vCPU ended the run, or a timeout/interrupt kicked it),
    ``crash`` (triple fault, failed entry, internal error), ``error`` (a kvmkit error,
    e.g. ``--strict``; ``error`` set).
    """

    kind: str
    code: int | None = None
    detail: str = ""
    error: KvmkitError | None = None
    state: dict[str, Any] = field(default_factory=dict)


class _Ended(Exception):
    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome


class VcpuLoop:
    """Runs one vCPU until the guest exits, crashes, or ``stopping`` is set and it is
    kicked.  Meant to be the body of that vCPU's thread."""

    def __init__(
        self,
        vcpu: Vcpu,
        bus: Bus,
        ctx: RunContext,
        stopping: threading.Event,
        *,
        strict: bool = False,
        halt_ends_run: bool = True,
    ) -> None:
        self.vcpu = vcpu
        self.bus = bus
        self.ctx = ctx
        self.stopping = stopping
        self.strict = strict
        #: Without an in-kernel irqchip nothing can wake a halted vCPU, so by default HLT
        #: ends the run; benchmarks that time HLT exits resume instead.
        self.halt_ends_run = halt_ends_run
        self.stats = VcpuStats()

    # ---- shared dispatch ----------------------------------------------------------
    def _unclaimed(self, what: str, addr: int, write: bool) -> None:
        self.stats.unclaimed[what, addr] += 1
        if self.strict:
            rip = self.vcpu.get_regs().rip
            raise BusError(
                f"guest {'wrote' if write else 'read'} unclaimed {what} {addr:#x} at RIP {rip:#x} (--strict)"
            )

    def dispatch(self, exit_: VcpuExit, *, count: bool) -> None:
        """Answer one exit.  ``count`` is False when the C fast path already counted the
        exit's kind and port.  Raises :class:`_Ended` when the loop must end."""
        stats = self.stats
        cls = type(exit_)
        if count:
            stats.exits[exit_name(exit_)] += 1
        if cls is IoOut:
            assert isinstance(exit_, IoOut)
            port = exit_.port
            if count:
                stats.ports[port] += 1
            dev = self.bus.ports.get(port)
            if dev is None:
                self._unclaimed("port", port, True)
            else:
                for i in range(exit_.count):
                    dev.io_out(port, exit_.size, exit_.data[i * exit_.size : (i + 1) * exit_.size])
        elif cls is IoIn:
            assert isinstance(exit_, IoIn)
            port = exit_.port
            if count:
                stats.ports[port] += 1
            dev = self.bus.ports.get(port)
            if dev is None:
                self._unclaimed("port", port, False)
                exit_.reply((1 << (8 * exit_.size)) - 1)
            else:
                exit_.reply(
                    b"".join(
                        (dev.io_in(port, exit_.size) & ((1 << (8 * exit_.size)) - 1)).to_bytes(
                            exit_.size, "little"
                        )
                        for _ in range(exit_.count)
                    )
                )
        elif cls is MmioWrite or cls is MmioRead:
            self._dispatch_mmio(exit_)
        elif cls is Interrupted:
            if self.stopping.is_set():
                raise _Ended(Outcome("stopped"))
        elif cls is Hlt:
            if self.halt_ends_run:
                raise _Ended(Outcome("halt", detail="the guest executed HLT"))
        elif cls is Shutdown:
            raise _Ended(
                Outcome(
                    "crash",
                    detail="triple fault (shutdown): the guest faulted with no usable handler",
                    state=self.where(),
                )
            )
        elif cls in (FailEntry, InternalError, SystemEvent):
            raise _Ended(
                Outcome("crash", detail=f"KVM stopped the guest: {exit_!r}", state=self.where())
            )
        elif cls is Debug:
            pass
        else:
            raise _Ended(Outcome("crash", detail=f"unexpected exit {exit_!r}", state=self.where()))

    def _dispatch_mmio(self, exit_: VcpuExit) -> None:
        if isinstance(exit_, MmioWrite):
            self.stats.mmio[exit_.addr] += 1
            dev = self.bus.mmio_device(exit_.addr)
            if dev is None:
                self._unclaimed("mmio", exit_.addr, True)
            else:
                dev.mmio_write(exit_.addr, exit_.data)
        elif isinstance(exit_, MmioRead):
            self.stats.mmio[exit_.addr] += 1
            dev = self.bus.mmio_device(exit_.addr)
            if dev is None:
                self._unclaimed("mmio", exit_.addr, False)
                exit_.reply((1 << (8 * exit_.length)) - 1)
            else:
                exit_.reply(dev.mmio_read(exit_.addr, exit_.length))

    def where(self) -> dict[str, Any]:
        """Where this vCPU is: registers and mode, for crash and timeout reports."""
        try:
            regs = self.vcpu.get_regs()
            sregs = self.vcpu.get_sregs()
        except KvmkitError:
            return {}
        if sregs.cr0 & 1 == 0:
            mode = "real"
        elif sregs.efer & 0x400:
            mode = "long"
        else:
            mode = "protected"
        return {
            "vcpu": self.vcpu.index,
            "rip": regs.rip,
            "cpl": sregs.cs.dpl,
            "mode": mode,
            "regs": regs.format(),
        }

    # ---- the Python loop ----------------------------------------------------------
    def run_python(self) -> Outcome:
        """Issue ``KVM_RUN`` from Python and dispatch every exit in Python.  Only the ioctl
        itself is timed as time in ``KVM_RUN``; decoding and dispatch count as VMM time,
        the same boundary the C fast path draws."""
        vcpu, stats, dispatch = self.vcpu, self.stats, self.dispatch
        exits, ports, port_map, mmio = stats.exits, stats.ports, self.bus.ports, stats.mmio
        mmio_device = self.bus.mmio_device
        kvm_run, fd = lib.kvmkit_kvm_run, vcpu.fd
        decode = vcpu.decode_exit
        now = time.monotonic_ns
        start = now()
        vcpu.bind_thread(threading.get_ident())
        try:
            while True:
                t0 = now()
                rc = kvm_run(fd)
                t1 = now()
                stats.kvm_run_calls += 1
                stats.ns_in_run += t1 - t0
                if rc < 0:
                    exit_: VcpuExit = vcpu.interrupted_or_raise(-rc)
                else:
                    exit_ = decode()
                if type(exit_) is IoOut:  # the hot case, inlined
                    exits["io_out"] += 1
                    port = exit_.port  # type: ignore[union-attr]
                    ports[port] += 1
                    dev = port_map.get(port)
                    if dev is not None and exit_.count == 1:  # type: ignore[union-attr]
                        dev.io_out(port, exit_.size, exit_.data)  # type: ignore[union-attr]
                        continue
                    dispatch(exit_, count=False)
                    continue
                if type(exit_) is MmioWrite:  # the other hot case
                    exits["mmio_write"] += 1
                    addr = exit_.addr  # type: ignore[union-attr]
                    mmio[addr] += 1
                    mdev = mmio_device(addr)
                    if mdev is not None:
                        mdev.mmio_write(addr, exit_.data)  # type: ignore[union-attr]
                    else:
                        self._unclaimed("mmio", addr, True)
                    continue
                dispatch(exit_, count=True)
        except GuestExit as g:
            return Outcome("exit", code=g.code)
        except _Ended as e:
            return e.outcome
        except KvmkitError as exc:
            return Outcome("error", error=exc, state=self.where())
        finally:
            vcpu.bind_thread(None)
            stats.ns_total = now() - start

    # ---- the C fast path ----------------------------------------------------------
    def _fastpath_config(self) -> tuple[Any, Any]:
        fp = ffi.new("struct kvmkit_fastpath *")
        fp.vcpu_fd = self.vcpu.fd
        fp.run = self.vcpu.kvm_run
        handled = {
            "console_port": DEBUGCON_PORT,
            "exit_port": DEBUG_EXIT_PORT,
            "exit_hypercall_port": HYPERCALL_BASE + HC_EXIT,
            "mark_port": HYPERCALL_BASE + HC_MARK,
        }
        for field_name, port in handled.items():
            # only ports whose device is the standard one may be short-circuited in C
            setattr(fp, field_name, port if port in self.bus.ports else -1)
        regions = self.ctx.vm.regions
        if len(regions) > lib.KVMKIT_MAX_REGIONS:
            fp.exit_hypercall_port = fp.mark_port = -1  # C cannot translate; Python will
        for i, region in enumerate(regions[: lib.KVMKIT_MAX_REGIONS]):
            fp.regions[i].gpa = region.guest_phys
            fp.regions[i].size = region.size
            fp.regions[i].hva = ffi.cast("uint8_t *", region.host_address)
        fp.nregions = min(len(regions), lib.KVMKIT_MAX_REGIONS)
        port_counts = ffi.new("uint64_t[65536]")
        fp.port_counts = port_counts
        return fp, port_counts

    def _drain(self, fp: Any) -> None:
        if fp.console_len:
            self.ctx.console.write(bytes(ffi.buffer(fp.console, fp.console_len)))
            fp.console_len = 0
        for i in range(fp.nmarks):
            m = fp.marks[i]
            label = bytes(ffi.buffer(m.label, m.len)).decode("utf-8", "replace")
            self.ctx.add_mark(label, m.ns, self.vcpu.index)
        fp.nmarks = 0

    def run_fast(self) -> Outcome:
        fp, port_counts = self._fastpath_config()
        vcpu = self.vcpu
        start = time.monotonic_ns()
        vcpu.bind_thread(threading.get_ident())
        try:
            while True:
                rc = lib.kvmkit_fast_run(fp)
                self._drain(fp)
                if rc == lib.KVMKIT_FP_UNHANDLED:
                    self.dispatch(vcpu.decode_exit(), count=False)
                elif rc == lib.KVMKIT_FP_GUEST_EXIT:
                    return Outcome("exit", code=int(fp.exit_value))
                elif rc == lib.KVMKIT_FP_INTERRUPTED:
                    if self.stopping.is_set():
                        return Outcome("stopped")
                elif rc < 0:
                    raise KvmIoctlError("KVM_RUN", -rc, repr(vcpu))
        except GuestExit as g:
            return Outcome("exit", code=g.code)
        except _Ended as e:
            return e.outcome
        except KvmkitError as exc:
            return Outcome("error", error=exc, state=self.where())
        finally:
            vcpu.bind_thread(None)
            self.stats.ns_total = time.monotonic_ns() - start
            self._merge_c_counters(fp, port_counts)

    def _merge_c_counters(self, fp: Any, port_counts: Any) -> None:
        stats = self.stats
        stats.kvm_run_calls += fp.run_calls
        stats.ns_in_run += fp.ns_in_run
        for kind, name in enumerate(KINDS):
            if fp.exits[kind]:
                stats.exits[name] += fp.exits[kind]
        counts = memoryview(ffi.buffer(port_counts)).cast("Q")
        for port, n in enumerate(counts):
            if n:
                stats.ports[port] += n
