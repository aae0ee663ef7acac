"""The two run loops of one vCPU: a Python loop that dispatches every exit, and the C fast
path (``csrc/fastpath.c``) that handles the console, exit and mark ports, writes to
unclaimed MMIO and (when HLT resumes) HLT itself, and comes back to Python only for the
rest.  Both produce the same console output and statistics.

The bus is the one truth: the fast path serves a port only when the bus gives it to the
runner's standard device for it (checked by the registered object, not by the port).
The fast path's buffers are allocated once per loop, and its counters are merged into
:attr:`VcpuLoop.stats` when that is read, never inside the timed loop.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kvmkit._ffi import ffi, lib
from kvmkit.errors import KvmIoctlError, KvmkitError
from kvmkit.kvm import Vcpu
from kvmkit.kvm.dirty import EXIT_DIRTY_RING_FULL
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
    UnknownExit,
    VcpuExit,
    exit_name,
)
from kvmkit.runner.bus import Bus
from kvmkit.runner.context import GuestExit, RunContext
from kvmkit.runner.crashinfo import describe_internal_error
from kvmkit.runner.devices.debugcon import DEBUGCON_PORT, DebugConsole
from kvmkit.runner.devices.debugexit import DEBUG_EXIT_PORT, DebugExit
from kvmkit.runner.devices.hypercalls import HC_EXIT, HC_MARK, HYPERCALL_BASE, Hypercalls
from kvmkit.runner.errors import BusError, GuestCrashError
from kvmkit.runner.stats import KINDS, VcpuStats

_RFLAGS_IF = 1 << 9


class PauseGate:
    """Pause and resume every vCPU loop of one machine, separate from stopping it.

    :meth:`pause` kicks every vCPU and returns once each running loop has parked at its
    next exit (so no vCPU is in ``KVM_RUN`` and its state may be read); :meth:`resume`
    lets them go on.  A loop that has ended counts as parked.  One pauser at a time
    (the machine serialises pause/resume)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.requested = False
        self._running = 0
        self._parked = 0
        #: Loops that have ended (the run is over: a pause then pauses nothing).
        self.ended = 0

    def enter(self) -> None:
        """A loop starts (on its vCPU thread)."""
        with self._cond:
            self._running += 1

    def leave(self) -> None:
        """A loop ended."""
        with self._cond:
            self._running -= 1
            self.ended += 1
            self._cond.notify_all()

    def park(self, stopping: threading.Event) -> None:
        """Called by a loop outside ``KVM_RUN``: wait while a pause is requested."""
        with self._cond:
            self._parked += 1
            self._cond.notify_all()
            while self.requested and not stopping.is_set():
                self._cond.wait(0.1)
            self._parked -= 1
            self._cond.notify_all()

    def pause(self, vcpus: list[Vcpu], *, timeout: float = 10.0) -> bool:
        """Request a pause, kick every vCPU until each running loop has parked; False
        (pause still requested) if that did not happen within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self.requested = True
        while True:
            with self._cond:
                if self._parked >= self._running:
                    return True
            if time.monotonic() > deadline:
                return False
            for v in vcpus:
                if not v.closed:
                    v.kick()
            with self._cond:
                self._cond.wait_for(lambda: self._parked >= self._running, 0.01)

    def resume(self) -> None:
        with self._cond:
            self.requested = False
            self._cond.notify_all()


@dataclass
class Outcome:
    """How one vCPU's loop ended.

    ``kind``: ``exit`` (the guest asked, ``code`` set), ``halt`` (HLT with no irqchip),
    ``stopped`` (another vCPU ended the run, a device asked for reset/power-off, or a
    timeout/interrupt kicked it), ``reset``/``poweroff`` (KVM's system event),
    ``crash`` (triple fault — ``triple_fault`` set —, failed entry, internal error, a
    guest fault a device reported), ``error`` (a kvmkit error, e.g. ``--strict``;
    ``error`` set).
    """

    kind: str
    code: int | None = None
    detail: str = ""
    error: KvmkitError | None = None
    state: dict[str, Any] = field(default_factory=dict)
    triple_fault: bool = False


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
        gate: PauseGate | None = None,
        on_dirty_ring_full: Any = None,
    ) -> None:
        self.vcpu = vcpu
        self.bus = bus
        self.ctx = ctx
        self.stopping = stopping
        self.strict = strict
        #: Without an in-kernel irqchip nothing can wake a halted vCPU, so by default HLT
        #: ends the run; benchmarks that time HLT exits resume instead.
        self.halt_ends_run = halt_ends_run
        #: Pauses (snapshot, migration) park the loop here at its next exit.
        self.gate = gate
        #: ``f(vcpu)`` called on ``KVM_EXIT_DIRTY_RING_FULL`` (the machine harvests or
        #: waits for its collector); without it the loop harvests its own ring.
        self.on_dirty_ring_full = on_dirty_ring_full
        self._stats = VcpuStats()
        self._fp_keep: tuple[Any, ...] = ()
        #: The C fast path's state, allocated here, once, not in the (timed) run_fast().
        self._fp: Any = self._fastpath()
        #: Idle probes (see :meth:`request_probe`): the answer and when it came.
        self._probe_wanted = False
        self.probe_done = threading.Event()
        self.probe_state = "running"

    @property
    def stats(self) -> VcpuStats:
        """The statistics of this vCPU, with the C fast path's counters merged in (the merge
        happens here, when read, outside any timed loop).  Read it when the loop is not
        running."""
        self._merge_c_counters(self._fp)
        return self._stats

    # ---- idle probes (the machine ends a run whose vCPUs can never wake) -------------
    def request_probe(self) -> None:
        """Ask this vCPU's thread, from any thread, to report its idle state: the vCPU is
        kicked out of ``KVM_RUN``, records :attr:`probe_state` and sets
        :attr:`probe_done`, then resumes the guest.  Clear ``probe_done`` first."""
        self._probe_wanted = True
        self.vcpu.kick()

    def _answer_probe(self) -> None:
        self._probe_wanted = False
        try:
            self.probe_state = self._idle_state()
        except KvmkitError:
            self.probe_state = "running"  # when in doubt, never end the run
        self.probe_done.set()

    def _idle_state(self) -> str:
        """``halted-if0`` (halted, interrupts off, no NMI pending: only INIT/SIPI/NMI
        could wake it), ``waiting-sipi`` (an AP never started), ``halted`` (halted with
        interrupts on) or ``running``.  Called on this vCPU's thread, outside KVM_RUN."""
        mp = self.vcpu.get_mp_state()
        if mp in (lib.KVM_MP_STATE_UNINITIALIZED, lib.KVM_MP_STATE_INIT_RECEIVED):
            return "waiting-sipi"
        if mp != lib.KVM_MP_STATE_HALTED:
            return "running"
        if self.vcpu.get_regs().rflags & _RFLAGS_IF:
            return "halted"
        nmi = self.vcpu.get_vcpu_events().nmi
        return "halted" if nmi.pending or nmi.injected else "halted-if0"

    # ---- shared dispatch ----------------------------------------------------------
    def _unclaimed(self, what: str, addr: int, write: bool) -> None:
        self._stats.unclaimed[what, addr] += 1
        if self.strict:
            rip = self.vcpu.get_regs().rip
            raise BusError(
                f"guest {'wrote' if write else 'read'} unclaimed {what} {addr:#x} at RIP {rip:#x} (--strict)"
            )

    def dispatch(self, exit_: VcpuExit, *, count: bool) -> None:
        """Answer one exit.  ``count`` is False when the C fast path already counted the
        exit's kind and port.  Raises :class:`_Ended` when the loop must end."""
        stats = self._stats
        cls = type(exit_)
        if count:
            stats.exits[exit_name(exit_)] += 1
        if cls is IoOut:
            assert isinstance(exit_, IoOut)
            port = exit_.port
            if count:
                stats.ports[port] += 1
            dev = self.bus.port_device(port)
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
            dev = self.bus.port_device(port)
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
            self._interrupted()
        elif cls is Hlt:
            if self.halt_ends_run:
                raise _Ended(Outcome("halt", detail="the guest executed HLT"))
        elif cls is Shutdown:
            raise _Ended(
                Outcome(
                    "crash",
                    detail="triple fault (shutdown): the guest faulted with no usable handler",
                    state=self.where(),
                    triple_fault=True,
                )
            )
        elif cls is InternalError:
            assert isinstance(exit_, InternalError)
            detail = describe_internal_error(exit_, self.vcpu)
            raise _Ended(Outcome("crash", detail=detail, state=self.where()))
        elif cls is SystemEvent:
            assert isinstance(exit_, SystemEvent)
            raise _Ended(self._system_event(exit_))
        elif cls is FailEntry:
            raise _Ended(
                Outcome("crash", detail=f"KVM stopped the guest: {exit_!r}", state=self.where())
            )
        elif cls is Debug:
            pass
        elif isinstance(exit_, UnknownExit) and exit_.reason == EXIT_DIRTY_RING_FULL:
            self._dirty_ring_full()
        else:
            raise _Ended(Outcome("crash", detail=f"unexpected exit {exit_!r}", state=self.where()))

    def _interrupted(self) -> None:
        if self.stopping.is_set():
            raise _Ended(Outcome("stopped"))
        if self._probe_wanted:
            self._answer_probe()
        if self.gate is not None and self.gate.requested:
            self.gate.park(self.stopping)
            if self.stopping.is_set():
                raise _Ended(Outcome("stopped"))

    def _dirty_ring_full(self) -> None:
        """``KVM_EXIT_DIRTY_RING_FULL``: let the machine's collector harvest (it resets
        the rings), or harvest this vCPU's ring and reset; then the guest goes on."""
        if self.on_dirty_ring_full is not None:
            self.on_dirty_ring_full(self.vcpu)
        else:
            self.vcpu.dirty_ring().harvest()
            self.ctx.vm.reset_dirty_rings()

    def _system_event(self, ev: SystemEvent) -> Outcome:
        if ev.type == lib.KVM_SYSTEM_EVENT_RESET:
            return Outcome("reset", detail="the guest reset the machine (KVM system event)")
        if ev.type == lib.KVM_SYSTEM_EVENT_SHUTDOWN:
            return Outcome(
                "poweroff", detail="the guest powered the machine off (KVM system event)"
            )
        return Outcome("crash", detail=f"KVM stopped the guest: {ev!r}", state=self.where())

    def _dispatch_mmio(self, exit_: VcpuExit) -> None:
        if isinstance(exit_, MmioWrite):
            self._stats.mmio[exit_.addr] += 1
            dev = self.bus.mmio_device(exit_.addr)
            if dev is None:
                self._unclaimed("mmio", exit_.addr, True)
            else:
                dev.mmio_write(exit_.addr, exit_.data)
        elif isinstance(exit_, MmioRead):
            self._stats.mmio[exit_.addr] += 1
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
        vcpu, stats, dispatch = self.vcpu, self._stats, self.dispatch
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
                    port = exit_.port
                    ports[port] += 1
                    dev = port_map.get(port)
                    if dev is not None and exit_.count == 1:
                        dev.io_out(port, exit_.size, exit_.data)
                        continue
                    dispatch(exit_, count=False)
                    continue
                if type(exit_) is MmioWrite:  # the other hot case
                    exits["mmio_write"] += 1
                    addr = exit_.addr
                    mmio[addr] += 1
                    mdev = mmio_device(addr)
                    if mdev is not None:
                        mdev.mmio_write(addr, exit_.data)
                    else:
                        self._unclaimed("mmio", addr, True)
                    continue
                dispatch(exit_, count=True)
        except GuestExit as g:
            return Outcome("exit", code=g.code)
        except _Ended as e:
            return e.outcome
        except GuestCrashError as exc:
            return Outcome("crash", detail=str(exc), state=self.where())
        except KvmkitError as exc:
            return Outcome("error", error=exc, state=self.where())
        finally:
            vcpu.bind_thread(None)
            stats.ns_total += now() - start

    # ---- the C fast path ----------------------------------------------------------
    def _standard_port(self, port: int, cls: type) -> int:
        """``port`` if the bus gives it to the runner's own ``cls`` device wired to this
        run's context (so C may answer it exactly as that device would), else -1."""
        dev = self.bus.port_device(port)
        if type(dev) is not cls:
            return -1
        if isinstance(dev, DebugConsole) and dev.console is not self.ctx.console:
            return -1
        if isinstance(dev, Hypercalls) and dev.ctx is not self.ctx:
            return -1
        return port

    def _fastpath(self) -> Any:
        """The fast path's state (port table included; calloc'd, so untouched pages cost
        nothing).  The bus must be complete: what C may serve is decided here."""
        fp = ffi.new("struct kvmkit_fastpath *")
        fp.vcpu_fd = self.vcpu.fd
        fp.run = self.vcpu.kvm_run
        fp.console_port = self._standard_port(DEBUGCON_PORT, DebugConsole)
        fp.exit_port = self._standard_port(DEBUG_EXIT_PORT, DebugExit)
        fp.exit_hypercall_port = self._standard_port(HYPERCALL_BASE + HC_EXIT, Hypercalls)
        fp.mark_port = self._standard_port(HYPERCALL_BASE + HC_MARK, Hypercalls)
        regions = self.ctx.vm.regions
        if len(regions) > lib.KVMKIT_MAX_REGIONS:
            fp.exit_hypercall_port = fp.mark_port = -1  # C cannot translate; Python will
        for i, region in enumerate(regions[: lib.KVMKIT_MAX_REGIONS]):
            fp.regions[i].gpa = region.guest_phys
            fp.regions[i].size = region.size
            fp.regions[i].hva = ffi.cast("uint8_t *", region.host_address)
        fp.nregions = min(len(regions), lib.KVMKIT_MAX_REGIONS)
        # HLT resumes (the bare machine in benchmark mode): nothing for Python to do
        fp.hlt_resume = int(not self.halt_ends_run)
        # writes to MMIO no device claims are dropped and counted: C may do that itself,
        # given the claimed ranges (the bus is complete here), unless --strict must trip
        claimed = self.bus.mmio_ranges()
        fp.mmio_sink = int(not self.strict and len(claimed) <= lib.KVMKIT_MAX_CLAIMED)
        for i, (start, end) in enumerate(claimed[: lib.KVMKIT_MAX_CLAIMED]):
            fp.claimed[i].start = start
            fp.claimed[i].end = end
        fp.nclaimed = min(len(claimed), lib.KVMKIT_MAX_CLAIMED)
        port_counts = ffi.new("uint64_t[65536]")
        touched = ffi.new("uint16_t[65536]")
        fp.port_counts = port_counts
        fp.touched = touched
        self._fp_keep = (port_counts, touched)  # keep them alive as long as fp
        return fp

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
        fp = self._fp
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
                    self._interrupted()
                elif rc < 0:
                    raise KvmIoctlError("KVM_RUN", -rc, repr(vcpu))
        except GuestExit as g:
            return Outcome("exit", code=g.code)
        except _Ended as e:
            return e.outcome
        except GuestCrashError as exc:
            return Outcome("crash", detail=str(exc), state=self.where())
        except KvmkitError as exc:
            return Outcome("error", error=exc, state=self.where())
        finally:
            vcpu.bind_thread(None)
            self._stats.ns_total += time.monotonic_ns() - start

    def _merge_c_counters(self, fp: Any) -> None:
        """Move the C counters into :attr:`_stats` and zero them (so merging twice never
        counts twice).  Only the ports C saw are visited, not all 65,536."""
        stats = self._stats
        stats.kvm_run_calls += fp.run_calls
        stats.ns_in_run += fp.ns_in_run
        fp.run_calls = fp.ns_in_run = 0
        for kind, name in enumerate(KINDS):
            if fp.exits[kind]:
                stats.exits[name] += fp.exits[kind]
                fp.exits[kind] = 0
        counts, touched = fp.port_counts, fp.touched
        for i in range(fp.ntouched):
            port = touched[i]
            stats.ports[port] += counts[port]
            counts[port] = 0
        fp.ntouched = 0
        for i in range(fp.nsink):
            addr, n = fp.sink[i].addr, fp.sink[i].n
            stats.mmio[addr] += n
            stats.unclaimed["mmio", addr] += n
        fp.nsink = 0
