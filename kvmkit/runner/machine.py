"""``run_guest``: one call from an image file to a finished run — memory, loader, mode,
devices, one thread per vCPU, timeout, statistics.

Guest-physical layout: RAM split as QEMU's ``pc`` machine splits it (all at 0 below
3.5 GiB; else 3 GiB at 0 and the rest at 4 GiB, the PCI hole with the LAPIC, IOAPIC and
MMIO devices in between: :mod:`kvmkit.runner.loaders.layout`).  The image goes where it
says; around it, each in the first free place (the preferred one when the image leaves
it free)::

    0x009000-0x009557  multiboot e820 map and info block (else after the image)
    0x020000-0x02afff  runner's GDT, IDT, TSS (+I/O bitmap), page tables (protected/long)
    0x070000-0x07ffff  initial stack (top 0x80000)
    after the image    multiboot module table, strings and modules (as QEMU)

Interrupts: every VM gets the in-kernel irqchip (PIC, IOAPIC, one LAPIC per vCPU) and
PIT before its vCPUs, as kvmtool, Firecracker and QEMU create them; HLT then waits in
the kernel.  ``irqchip=False`` (``--no-irqchip``) keeps the bare machine: one vCPU, and
HLT exits to the VMM and ends the run.

When the run ends (``RunResult.reason``): ``exit`` — the guest wrote its exit value
(port 0xf4 or the exit hypercall); ``halt`` — it can never run again: on the bare
machine it executed HLT, with the irqchip every vCPU is halted with interrupts off (or
is an AP never started) and no NMI pending.  Nothing but INIT/SIPI/NMI can wake such a
vCPU and no vCPU is left to send one, so the main thread, which asks every vCPU for
its MP state and RFLAGS.IF from time to time (each asks on its own thread, after a kick;
the interval grows from 20 ms to 0.5 s), ends the run after two such answers in a
row.  A guest halted with interrupts *on* may still be woken by a timer or a device
(e.g. the UART's stdin), so it runs until ``timeout``.  ``reset`` — a device called
``RunContext.request_reset`` (or KVM reported a reset event) without ``reboot``;
``poweroff``; ``timeout``; ``crash``; ``interrupted``; ``error``.  With ``reboot``, a
reset or a triple fault restarts the guest from its image in a fresh VM (the console
carries on; the timeout covers the whole run).

Process status (``RunResult.process_status``): the guest's exit value when it is 0 to
255, and 255 for any larger value (so no non-zero value ever becomes 0; ``--json``
reports the value whole); 0 for halt, reset and poweroff (as QEMU's ``-no-reboot``);
124 timeout; 125 crash; 130 interrupted.  A :class:`Machine` run may also end
``snapshot`` or ``migrated`` (status 0: the guest lives on elsewhere) or ``stopped``
(:meth:`Machine.stop`, status 130).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from kvmkit.errors import KvmkitError
from kvmkit.kvm import Kvm, Vm
from kvmkit.kvm.caps import Cap
from kvmkit.kvm.modes import DEFAULT_TABLES_AT, TABLES_SIZE, Mode, setup_mode
from kvmkit.runner.bus import Bus, PortDevice
from kvmkit.runner.context import DEFAULT_CONSOLE_LIMIT, Console, RunContext
from kvmkit.runner.devices import DebugConsole, DebugExit, FwCfg, Hypercalls, Uart8250
from kvmkit.runner.devices.acpi import acpi_tables_span
from kvmkit.runner.devices.debugcon import DEBUGCON_PORT
from kvmkit.runner.devices.debugexit import DEBUG_EXIT_PORT
from kvmkit.runner.devices.fwcfg import FW_CFG_PORT_SEL
from kvmkit.runner.devices.hypercalls import HYPERCALL_BASE, HYPERCALL_COUNT
from kvmkit.runner.devices.uart import COM1_PORT, forward_input
from kvmkit.runner.errors import ImageError, MachineEndedError, RunnerError
from kvmkit.runner.irq import IrqChipLines
from kvmkit.runner.loaders.layout import (
    KVM_IDENTITY_MAP_ADDR,
    KVM_TSS_ADDR,
    amd_ht_hole,
    e820_map,
    find_free,
    pc_ram_layout,
)
from kvmkit.runner.loop import Outcome, PauseGate, VcpuLoop
from kvmkit.runner.platform import check_device_names, install_pc_platform
from kvmkit.runner.stats import RunStats

MiB = 1 << 20
GiB = 1 << 30
STACK_SIZE = 0x10000
STACK_PREFERRED = 0x70000  # top 0x80000
#: The lowest address the runner puts its own things at (the real-mode IVT and BDA below).
RUNNER_LOW = 0x1000
REAL_MODE_TOP = 0xA0000
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002

#: Process exit statuses of ``kvmkit run`` for endings other than the guest's own code.
STATUS_HALT = 0
STATUS_EXIT_OVERFLOW = 255
STATUS_TIMEOUT = 124
STATUS_CRASH = 125
STATUS_INTERRUPTED = 130


@dataclass
class RunConfig:
    """What to run and how.  ``mode`` None means the image's own (multiboot: protected,
    ELF64: long, ELF32: protected; flat images default to long)."""

    image: Path
    mode: Mode | None = None
    cpl: int = 0
    mem_size: int = 64 * MiB
    vcpus: int = 1
    timeout: float | None = None
    strict: bool = False
    python_loop: bool = False
    append: str = ""
    modules: Sequence[Path] = ()
    load_addr: int | None = None
    echo: TextIO | None = field(default_factory=lambda: sys.stdout)
    #: QEMU's ``-cpu`` spelling: ``host``, ``host,+x2apic,-pku`` (see kvmkit.runner.cpu).
    cpu: str = "host"
    #: Explicit huge pages (MAP_HUGETLB); by default RAM gets transparent huge pages.
    hugepages: bool = False
    #: QEMU's ``-mem-path``: a directory (e.g. a hugetlbfs mount) to back RAM with.
    mem_path: Path | None = None
    #: Optional platform devices, by QEMU's ``-device`` name: pc-testdev, pci-testdev.
    devices: Sequence[str] = ()
    #: In-kernel PIC/IOAPIC/LAPICs and PIT (False: the bare machine, one vCPU).
    irqchip: bool = True
    #: Restart the guest on reset or triple fault instead of ending the run.
    reboot: bool = False
    #: Console bytes kept in the result (the echo stream gets every byte).
    console_limit: int = DEFAULT_CONSOLE_LIMIT
    #: A file descriptor (terminal or pipe) whose bytes go to the UART's receiver.
    stdin_fd: int | None = None
    #: Your own port devices, ``(base, count, make)`` with ``make(ctx) -> device``; they
    #: are registered first, and a standard device whose ports they take is left out;
    #: one with a ``close()`` is closed when the boot ends, before its VM.
    port_devices: Sequence[tuple[int, int, Callable[[RunContext], PortDevice]]] = ()


@dataclass
class RunResult:
    """How a run ended, what the guest printed, and the statistics.

    ``console`` is the last ``console_limit`` bytes (``console_dropped`` more came
    before them); after ``reboots`` restarts (``reboot=True``) the console spans every
    boot and ``stats`` is the last boot's.
    """

    #: exit | halt | reset | poweroff | timeout | crash | interrupted | error, and for a
    #: Machine: snapshot | migrated (the run's action ended it) | stopped (Machine.stop)
    reason: str
    exit_code: int | None
    console: str
    stats: RunStats
    detail: str = ""
    vcpu_states: list[dict[str, Any]] = field(default_factory=list)
    image_kind: str = ""
    mode: str = ""
    cpl: int = 0
    loop: str = ""
    reboots: int = 0
    console_dropped: int = 0

    @property
    def process_status(self) -> int:
        """What ``kvmkit run`` exits with (see the module docstring for the mapping)."""
        if self.reason == "exit":
            return exit_status(int(self.exit_code or 0))
        return {
            "halt": STATUS_HALT,
            "reset": STATUS_HALT,
            "poweroff": STATUS_HALT,
            "timeout": STATUS_TIMEOUT,
            "interrupted": STATUS_INTERRUPTED,
            "stopped": STATUS_INTERRUPTED,
            "snapshot": STATUS_HALT,
            "migrated": STATUS_HALT,
        }.get(self.reason, STATUS_CRASH)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "exit_code": self.exit_code,
            "reason": self.reason,
            "console": self.console,
            "image_kind": self.image_kind,
            "mode": self.mode,
            "cpl": self.cpl,
            "loop": self.loop,
            "reboots": self.reboots,
            "console_dropped_bytes": self.console_dropped,
        }
        out.update(self.stats.to_json())
        if self.detail:
            out["detail"] = self.detail
        if self.vcpu_states:
            out["vcpus"] = self.vcpu_states
        return out


def exit_status(code: int) -> int:
    """The process status for guest exit value ``code``: itself for 0-255, else 255."""
    return code if 0 <= code <= 0xFF else STATUS_EXIT_OVERFLOW


def check_mem_size(size: int) -> None:
    if size < 2 * MiB or size % (4096):
        raise RunnerError(f"guest memory of {size} bytes: give at least 2 MiB, in whole pages")


def _runner_places(
    image: Any, occupied: list[tuple[int, int]], mode: Mode, low_ram: int
) -> tuple[int, int]:
    """``(tables_at, stack_top)``: free places for the runner's tables and stack."""
    tables_at = find_free(
        TABLES_SIZE, avoid=occupied, low=RUNNER_LOW, high=low_ram, prefer=DEFAULT_TABLES_AT
    )
    if tables_at is None:
        raise ImageError(image.path, "leaves no room for the runner's tables: give more memory")
    high = min(low_ram, REAL_MODE_TOP) if mode is Mode.REAL else low_ram
    stack = find_free(
        STACK_SIZE,
        avoid=[*occupied, (tables_at, tables_at + TABLES_SIZE)],
        low=RUNNER_LOW,
        high=high,
        prefer=STACK_PREFERRED,
    )
    if stack is None:
        raise ImageError(image.path, "leaves no room for the initial stack: give more memory")
    return tables_at, stack + STACK_SIZE


def build_bus(
    ctx: RunContext,
    *,
    mem_size: int,
    vcpus: int,
    port_devices: Sequence[tuple[int, int, Callable[[RunContext], PortDevice]]] = (),
) -> Bus:
    """A fresh bus: ``port_devices`` first, then each of the runner's standard devices
    whose ports are all still free (the bus is the one truth: a port a caller's device
    took is that device's, also for the C fast path)."""
    bus = Bus()
    for base, count, make in port_devices:
        bus.register_ports(base, count, make(ctx))
    standard: list[tuple[int, int, Callable[[], PortDevice]]] = [
        (DEBUGCON_PORT, 1, lambda: DebugConsole(ctx.console)),
        (DEBUG_EXIT_PORT, 4, DebugExit),
        (COM1_PORT, 8, lambda: Uart8250(ctx.console, irq=ctx.irq)),
        (FW_CFG_PORT_SEL, 2, lambda: FwCfg(ram_size=mem_size, cpus=vcpus)),
        (HYPERCALL_BASE + 1, HYPERCALL_COUNT - 1, lambda: Hypercalls(ctx)),
    ]
    for base, count, make_std in standard:
        if all(bus.port_device(p) is None for p in range(base, base + count)):
            bus.register_ports(base, count, make_std())
    return bus


def run_guest(
    config: RunConfig,
    *,
    kvm: Kvm | None = None,
    action: tuple[float, Callable[[Machine], tuple[str, str] | None]] | None = None,
    dirty_tracking: bool = False,
) -> RunResult:
    """Load ``config.image`` into a fresh VM and run it to the end.

    ``action`` is ``(seconds, fn)``: ``fn(machine)`` is called that long after the first
    boot starts, on the calling thread while the vCPUs run (it may snapshot or migrate
    the machine); a ``(reason, detail)`` it returns ends the run with that reason
    (``snapshot``, ``migrated``: process status 0).  ``dirty_tracking`` prepares the VM
    for :meth:`Machine.migrate`.

    Raises :class:`~kvmkit.runner.errors.ImageError` for an image that cannot be loaded
    and :class:`RunnerError` for an impossible configuration; how the guest itself ended
    (exit code, crash, timeout) is in the result, not an exception.
    """
    from kvmkit.runner.cpu import parse_cpu_model
    from kvmkit.runner.loaders import Module, load_image, plan_multiboot_info

    if not 1 <= config.vcpus <= 255:
        raise RunnerError(f"--vcpus {config.vcpus}: give 1 to 255")
    if config.cpl not in (0, 3):
        raise RunnerError(f"--cpl {config.cpl}: give 0 or 3")
    check_mem_size(config.mem_size)
    cpu_model = parse_cpu_model(config.cpu)
    low_ram = pc_ram_layout(config.mem_size).below_4g
    check_device_names(config.devices)
    acpi_span = acpi_tables_span(config.vcpus)  # the platform's tables, from 0xF0000
    image = load_image(
        config.image,
        ram_size=low_ram,
        load_addr=config.load_addr,
        flat_mode=config.mode or Mode.LONG,
        reserved=[acpi_span],
    )
    mode = image.mode if image.kind != "flat" else (config.mode or Mode.LONG)
    if config.mode is not None and image.kind != "flat" and config.mode != image.mode:
        raise RunnerError(
            f"{config.image} is a {image.kind} image, which starts in {image.mode.value} mode, "
            f"not {config.mode.value}"
        )
    if image.kind == "multiboot" and config.cpl != 0:
        raise RunnerError("multiboot images start at CPL 0 (the kernel drops to user mode itself)")
    if mode is Mode.REAL and config.cpl != 0:
        raise RunnerError("real mode has no CPL 3")
    if image.kind != "multiboot" and (config.modules or config.append):
        raise RunnerError("--module and --append only apply to multiboot images")

    if not config.irqchip and config.vcpus > 1:
        raise RunnerError(
            f"--no-irqchip with --vcpus {config.vcpus}: the bare machine has one vCPU "
            "(without LAPICs the others cannot be started)"
        )
    if config.timeout is not None and not 0 < config.timeout < float("inf"):
        raise RunnerError(f"timeout {config.timeout!r}: give a finite number of seconds > 0")

    console = Console(config.echo, limit=config.console_limit)
    deadline = None if config.timeout is None else time.monotonic() + config.timeout
    own_kvm = kvm is None
    kvm = kvm or Kvm()
    reboots = 0
    try:
        if config.vcpus > kvm.max_vcpus:
            raise RunnerError(
                f"--vcpus {config.vcpus}: this KVM runs at most {kvm.max_vcpus} vCPUs per VM"
            )
        # A feature this KVM cannot give fails before any memory is mapped (what needs
        # the irqchip is checked again below, against the VM as built).
        cpu_model.cpuid(kvm, vcpu_index=0, vcpus=config.vcpus, irqchip=config.irqchip)
        occupied = [(s.addr, s.end) for s in image.segments if s.memsz] + [acpi_span]
        mb_plan = None
        if image.kind == "multiboot":
            e820 = e820_map(config.mem_size, amd_ht_hole=amd_ht_hole(kvm.supported_cpuid()))
            mb_plan = plan_multiboot_info(
                image,
                ram_size=config.mem_size,
                cmdline=f"{config.image.name} {config.append}".rstrip(),
                modules=[Module(Path(m), Path(m).name) for m in config.modules],
                e820=e820,
            )
            occupied += mb_plan.ranges
        tables_at, stack_top = _runner_places(image, occupied, mode, low_ram)
        boot = _Boot(image, mode, mb_plan, cpu_model, tables_at, stack_top)
        while True:
            result = _boot(config, kvm, boot, console, deadline, action, dirty_tracking)
            action = None  # only the first boot
            if result.reason == "reset" and config.reboot:
                reboots += 1
                continue
            result.reboots = reboots
            result.console_dropped = console.dropped
            return result
    finally:
        if own_kvm:
            kvm.close()


@dataclass(frozen=True)
class _Boot:
    """What every boot of one run starts from (computed once, before the first boot)."""

    image: Any
    mode: Mode
    mb_plan: Any
    cpu_model: Any
    tables_at: int
    stack_top: int


def _boot(
    config: RunConfig,
    kvm: Kvm,
    plan: _Boot,
    console: Console,
    deadline: float | None,
    action: tuple[float, Callable[[Machine], tuple[str, str] | None]] | None = None,
    dirty_tracking: bool = False,
) -> RunResult:
    """One boot: a fresh VM with the image placed in it, run until it ends."""
    with Machine.boot(config, kvm, plan, console, dirty_tracking=dirty_tracking) as machine:
        bound = None
        if action is not None:
            delay, fn = action
            bound = (delay, lambda: fn(machine))
        return machine.run(deadline, action=bound)


#: Idle probes: the first after this many seconds, then twice as long each time, to at
#: most PROBE_MAX; a vCPU that does not answer within PROBE_ANSWER counts as running.
PROBE_FIRST = 0.02
PROBE_MAX = 0.5
PROBE_ANSWER = 1.0
_ASLEEP = ("halted-if0", "waiting-sipi")


def _asleep_forever(loops: list[VcpuLoop], finished: threading.Event) -> bool:
    """Ask every vCPU for its idle state; True when each is halted with interrupts off
    (or is an AP never started) and at least one is halted: no vCPU can wake another."""
    for lp in loops:
        lp.probe_done.clear()
        lp.request_probe()
    for lp in loops:
        if finished.is_set() or not lp.probe_done.wait(PROBE_ANSWER):
            return False
    states = [lp.probe_state for lp in loops]
    return all(st in _ASLEEP for st in states) and "halted-if0" in states


def _wait_for_end(
    loops: list[VcpuLoop], finished: threading.Event, deadline: float | None, watch: bool
) -> str | None:
    """Wait until a vCPU ends the run (None), the deadline passes (``timeout``) or, with
    ``watch``, every vCPU sleeps forever (``halt``, after two probes in a row)."""
    interval, asleep = PROBE_FIRST, 0
    while True:
        wait = interval if watch else None
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            wait = left if wait is None else min(wait, left)
        if finished.wait(wait):
            return None
        if watch:
            asleep = asleep + 1 if _asleep_forever(loops, finished) else 0
            if asleep >= 2 and not finished.is_set():
                return "halt"
            interval = min(interval * 2, PROBE_MAX)


def _run_vcpus(
    config: RunConfig,
    ctx: RunContext,
    bus: Bus,
    vcpus: list[Any],
    kind: str,
    mode: Mode,
    deadline: float | None = None,
    *,
    gate: PauseGate | None = None,
    on_dirty_ring_full: Callable[[Any], None] | None = None,
    action: tuple[float, Callable[[], tuple[str, str] | None]] | None = None,
    started: Callable[[Callable[[], None]], None] | None = None,
) -> RunResult:
    """Run every vCPU on its own thread until the run ends.  ``action`` is ``(seconds,
    fn)``: ``fn()`` runs on this thread that long after the start, while the vCPUs run
    (it may pause them); a ``(reason, detail)`` it returns ends the run with that reason.
    ``started(stop_all)`` is called once the threads run."""
    stopping = threading.Event()
    loops = [
        VcpuLoop(
            v,
            bus,
            ctx,
            stopping,
            strict=config.strict,
            gate=gate,
            on_dirty_ring_full=on_dirty_ring_full,
        )
        for v in vcpus
    ]
    outcomes: list[Outcome | None] = [None] * len(vcpus)
    finished = threading.Event()

    def stop_all() -> None:
        stopping.set()
        finished.set()
        for v in vcpus:
            v.kick()

    ctx.stop_hook = stop_all

    def body(i: int) -> None:
        ctx.bind_vcpu_thread(i)
        loop = loops[i]
        try:
            outcomes[i] = loop.run_python() if config.python_loop else loop.run_fast()
        except BaseException as exc:  # never let a vCPU thread die silently
            outcomes[i] = Outcome("error", error=KvmkitError(f"vCPU {i} thread failed: {exc!r}"))
        finally:
            if gate is not None:
                gate.leave()
        outcome = outcomes[i]
        if outcome is not None and outcome.kind != "stopped":
            stop_all()

    start = time.monotonic()
    threads = [
        threading.Thread(target=body, args=(i,), name=f"vcpu{i}", daemon=True)
        for i in range(len(vcpus))
    ]
    if gate is not None:
        for _ in threads:
            gate.enter()
    for t in threads:
        t.start()
    if started is not None:
        started(stop_all)
    reason_override: str | None = None
    action_detail = ""
    action_error: BaseException | None = None
    try:
        if action is not None:
            delay, fn = action
            act_at = start + delay
            wait_until = act_at if deadline is None else min(act_at, deadline)
            reason_override = _wait_for_end(loops, finished, wait_until, watch=config.irqchip)
            if reason_override == "timeout" and (deadline is None or act_at < deadline):
                reason_override = None
                try:
                    ended_by = fn()
                except BaseException as exc:  # stop and join the vCPUs first, then raise
                    action_error = exc
                    ended_by = ("error", f"{exc}")
                if ended_by is not None:
                    reason_override, action_detail = ended_by
        if reason_override is None and not finished.is_set():
            reason_override = _wait_for_end(loops, finished, deadline, watch=config.irqchip)
    except KeyboardInterrupt:
        reason_override = "interrupted"
    if reason_override:
        stop_all()
        if gate is not None:
            gate.resume()
    for t in threads:
        while t.is_alive():
            t.join(timeout=0.5)
            if t.is_alive():  # a vCPU still blocked (e.g. an AP waiting for SIPI)
                for v in vcpus:
                    v.kick()
    if action_error is not None:
        raise action_error
    wall = time.monotonic() - start
    stats = RunStats.merge([lp.stats for lp in loops], ctx.marks, wall, ctx.marks_dropped)
    result = RunResult(
        reason="",
        exit_code=None,
        console=ctx.console.text(),
        stats=stats,
        image_kind=kind,
        mode=mode.value,
        cpl=config.cpl,
        loop="python" if config.python_loop else "c",
    )
    ended = [o for o in outcomes if o is not None and o.kind != "stopped"]
    if reason_override == "halt":
        result.reason = "halt"
        result.detail = (
            "every vCPU is halted with interrupts off (or was never started): nothing can wake them"
        )
        result.vcpu_states = [lp.where() for lp in loops]
    elif action_detail:
        result.reason, result.detail = reason_override or "", action_detail
    elif reason_override:
        result.reason = reason_override
        result.detail = f"{reason_override} after {wall:.2f} s"
        result.vcpu_states = [lp.where() for lp in loops]
    elif ctx.stop_request is not None:
        result.reason, result.detail = ctx.stop_request
        if result.reason == "reset" and not config.reboot:
            result.detail += " (run with --reboot to restart the guest instead)"
    elif ended:
        first = ended[0]
        if first.kind == "error" and first.error is not None:
            raise first.error
        result.reason, result.exit_code, result.detail = first.kind, first.code, first.detail
        if first.state:
            result.vcpu_states = [first.state]
        if first.triple_fault and config.reboot:
            result.reason = "reset"  # --reboot: a triple fault resets, as on a PC
    else:
        result.reason, result.detail = "error", "every vCPU stopped without a reason"
    return result


# ---- the machine as an object: pause, snapshot, restore, migrate -------------------------

#: Dirty-ring entries per vCPU when a migration may happen (16 B each: 1 MiB per vCPU).
DIRTY_RING_ENTRIES = 65536
#: Keys of RunConfig kept in a snapshot's/migration's machine settings.
_SETTINGS_VERSION = 1


def _settings(config: RunConfig, kind: str, mode: Mode) -> dict[str, Any]:
    return {
        "settings_version": _SETTINGS_VERSION,
        "image": str(config.image),
        "image_kind": kind,
        "mode": mode.value,
        "cpl": config.cpl,
        "mem_size": config.mem_size,
        "vcpus": config.vcpus,
        "irqchip": config.irqchip,
        "devices": list(config.devices),
        "strict": config.strict,
        "python_loop": config.python_loop,
    }


def _config_from_settings(
    settings: dict[str, Any], *, echo: TextIO | None, error: type[RunnerError]
) -> tuple[RunConfig, str, Mode]:
    """The RunConfig a restored/incoming machine runs with; ``error`` for bad settings."""
    try:
        if settings.get("settings_version") != _SETTINGS_VERSION:
            raise ValueError(f"settings version {settings.get('settings_version')!r}")
        config = RunConfig(
            image=Path(str(settings["image"])),
            cpl=int(settings["cpl"]),
            mem_size=int(settings["mem_size"]),
            vcpus=int(settings["vcpus"]),
            irqchip=bool(settings["irqchip"]),
            devices=tuple(str(d) for d in settings["devices"]),
            strict=bool(settings["strict"]),
            python_loop=bool(settings["python_loop"]),
            echo=echo,
        )
        mode = Mode(str(settings["mode"]))
        kind = str(settings["image_kind"])
        check_mem_size(config.mem_size)
        check_device_names(config.devices)
        if not 1 <= config.vcpus <= 255:
            raise ValueError(f"{config.vcpus} vCPUs")
    except (KeyError, TypeError, ValueError, RunnerError) as exc:
        raise error(f"the machine settings are malformed: {exc}") from None
    return config, kind, mode


class Machine:
    """One VM with its devices, ready to run (:meth:`run`), and while it runs: paused and
    resumed (:meth:`pause`, :meth:`resume`), snapshotted (:meth:`snapshot`) or
    live-migrated (:meth:`migrate`) from another thread, or from the ``action`` of
    :meth:`run`.  Made by :meth:`boot` (a fresh guest from its image), :meth:`restore`
    (from a snapshot directory) or :meth:`incoming` (from a migration stream).
    Close it (or use it as a context manager) when done.
    """

    def __init__(self, config: RunConfig, kvm: Kvm, vm: Vm, console: Console) -> None:
        self.config = config
        self.kvm = kvm
        self.vm = vm
        self.console = console
        self.ctx = RunContext(vm, console=console)  # irq lines once the irqchip exists
        self.bus: Bus | None = None
        self.platform: Any = None
        self.vcpus: list[Any] = []
        self.kind = ""
        self.mode = Mode.LONG
        self.gate = PauseGate()
        self._pause_lock = threading.Lock()
        self._pauses = 0  # pause() calls not yet undone by resume()
        self._collecting = False
        self._ring_lock = threading.Lock()
        self._stop_all: Callable[[], None] | None = None
        self._stopped = False
        self._feeder: threading.Thread | None = None
        self._feeding = threading.Event()

    # ---- building ------------------------------------------------------------------------
    @staticmethod
    def _new_vm(kvm: Kvm, config: RunConfig, dirty_tracking: bool) -> Vm:
        vm = kvm.create_vm()
        try:
            if dirty_tracking:
                vm.enable_dirty_ring(min(DIRTY_RING_ENTRIES, _max_ring_entries(vm)))
        except KvmkitError:
            pass  # no ring: the regions log dirty pages into bitmaps instead
        return vm

    def _add_platform(self, *, write_tables: bool = True) -> None:
        """irqchip/PIT, TSS, bus and platform devices (memory must be in place, and
        gets the ACPI tables unless ``write_tables`` is False)."""
        config, vm, ctx = self.config, self.vm, self.ctx
        if config.irqchip:  # before any vCPU, whatever their number
            vm.create_irqchip()
            vm.create_pit2()
            ctx.irq = IrqChipLines(vm)
        vm.set_tss_addr(KVM_TSS_ADDR)  # as QEMU: reported reserved in the e820 map
        if self.kvm.check_extension(Cap.SET_IDENTITY_MAP_ADDR):
            vm.set_identity_map_addr(KVM_IDENTITY_MAP_ADDR)
        self.bus = build_bus(
            ctx, mem_size=config.mem_size, vcpus=config.vcpus, port_devices=config.port_devices
        )
        self.platform = install_pc_platform(
            self.bus,
            vm,
            ctx.irq,
            mem_size=config.mem_size,
            vcpus=config.vcpus,
            devices=config.devices,
            on_reset=ctx.request_reset,
            on_poweroff=lambda: ctx.request_poweroff("ACPI S5 (PM1a control)"),
            write_tables=write_tables,
        )

    @classmethod
    def boot(
        cls,
        config: RunConfig,
        kvm: Kvm,
        plan: _Boot,
        console: Console,
        *,
        dirty_tracking: bool = False,
    ) -> Machine:
        """A fresh VM with ``plan``'s image placed in it and vCPU 0 at its entry.
        ``dirty_tracking`` (for a later :meth:`migrate`) turns on the dirty ring (or
        bitmap logging): it costs write faults, so plain runs leave it off."""
        from kvmkit.runner.loaders import place

        vm = cls._new_vm(kvm, config, dirty_tracking)
        m = cls(config, kvm, vm, console)
        try:
            for base, size in pc_ram_layout(config.mem_size).regions:
                vm.add_memory(
                    base,
                    size,
                    hugepages=config.hugepages,
                    backing=config.mem_path,
                    log_dirty=dirty_tracking,  # the ring needs it too
                )
            m._add_platform()
            place(plan.image, vm)
            m.kind, m.mode = plan.image.kind, plan.mode
            m.vcpus = [vm.create_vcpu(i) for i in range(config.vcpus)]
            setup_mode(
                m.vcpus[0],
                plan.mode,
                entry=plan.image.entry,
                stack=plan.stack_top,
                cpl=config.cpl,
                tables_at=plan.tables_at,
            )
            if plan.mb_plan is not None:
                regs = m.vcpus[0].get_regs()
                regs.rax, regs.rbx = MULTIBOOT_BOOTLOADER_MAGIC, plan.mb_plan.write(vm)
                m.vcpus[0].set_regs(regs)
            for i, vcpu in enumerate(m.vcpus):
                vcpu.set_cpuid2(
                    plan.cpu_model.cpuid(
                        kvm, vcpu_index=i, vcpus=config.vcpus, irqchip=vm.has_irqchip
                    )
                )
        except BaseException:
            m.close()
            raise
        return m

    @classmethod
    def restore(
        cls,
        path: str | Path,
        *,
        eager: bool = False,
        kvm: Kvm,
        echo: TextIO | None = sys.stdout,
        console_limit: int = DEFAULT_CONSOLE_LIMIT,
        expect_vcpus: int | None = None,
    ) -> Machine:
        """The machine a snapshot directory holds, ready to :meth:`run` on from where it
        was paused.  Memory is mapped ``MAP_PRIVATE`` from the snapshot (lazy), or read
        in first with ``eager``.  Every check fails with
        :class:`~kvmkit.runner.snapshot.SnapshotError` before the guest runs."""
        from kvmkit.runner.snapshot import Snapshot, SnapshotError

        snap = Snapshot.open(path, kvm=kvm, expect_vcpus=expect_vcpus)
        man = snap.manifest
        config, kind, mode = _config_from_settings(man.machine, echo=echo, error=SnapshotError)
        config.console_limit = console_limit
        if config.vcpus != man.vcpu_count:
            raise SnapshotError(
                f"snapshot manifest: machine has {config.vcpus} vCPUs, state has {man.vcpu_count}"
            )
        m = cls(config, kvm, kvm.create_vm(), Console(echo, limit=console_limit))
        m.kind, m.mode = kind, mode
        try:
            snap.map_memory(m.vm, eager=eager)
            m._add_platform(write_tables=False)  # the snapshot's memory holds them
            m.vcpus = snap.restore_state(m.vm)
            m.load_devices(man.devices, SnapshotError)
        except BaseException:
            m.close()
            raise
        return m

    # ---- devices ------------------------------------------------------------------------
    def _bus_devices(self) -> dict[str, Any]:
        """The bus's own devices (not the platform's), by name, each once."""
        assert self.bus is not None
        platform_ids = {id(d) for d in self.platform.devices.values()}
        out: dict[str, Any] = {}
        for dev in sorted(self.bus.port_devices(), key=lambda d: d.name):
            if id(dev) not in platform_ids and hasattr(dev, "save"):
                out.setdefault(dev.name, dev)
        return out

    def save_devices(self) -> dict[str, Any]:
        """Every device's ``save()``: the bus's own by name, the platform's under
        ``platform``.  The vCPUs must be paused."""
        out: dict[str, Any] = {n: d.save() for n, d in self._bus_devices().items()}
        out["platform"] = self.platform.save()
        return out

    def load_devices(self, state: dict[str, Any], error: type[RunnerError]) -> None:
        devices = self._bus_devices()
        missing = (set(devices) | {"platform"}) - set(state)
        extra = set(state) - (set(devices) | {"platform"})
        if missing or extra:
            raise error(
                f"the saved devices ({', '.join(sorted(state))}) are not this machine's "
                f"({', '.join(sorted([*devices, 'platform']))})"
            )
        try:
            for name, dev in devices.items():
                dev.load(state[name])
            self.platform.load(state["platform"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise error(f"a saved device state is malformed: {exc!r}") from None
        except RunnerError as exc:
            raise error(str(exc)) from None

    def settings(self) -> dict[str, Any]:
        return _settings(self.config, self.kind, self.mode)

    # ---- running ------------------------------------------------------------------------
    def run(
        self,
        deadline: float | None = None,
        *,
        action: tuple[float, Callable[[], tuple[str, str] | None]] | None = None,
    ) -> RunResult:
        """Run every vCPU until the run ends (see :func:`_run_vcpus` for ``action``)."""
        assert self.bus is not None
        uart = self.bus.port_device(COM1_PORT)
        if self.config.stdin_fd is not None and isinstance(uart, Uart8250):
            self._feeder = forward_input(uart, self.config.stdin_fd, self._feeding)

        def started(stop_all: Callable[[], None]) -> None:
            self._stop_all = stop_all
            if self._stopped:  # stop() came before the threads ran
                stop_all()

        try:
            return _run_vcpus(
                self.config,
                self.ctx,
                self.bus,
                self.vcpus,
                self.kind,
                self.mode,
                deadline,
                gate=self.gate,
                on_dirty_ring_full=self._dirty_ring_full,
                action=action,
                started=started,
            )
        finally:
            self._stop_all = None
            self._resume_all()  # pauses left by snapshot(resume=False) or a migration
            self._feeding.set()
            if self._feeder is not None:
                self._feeder.join()

    def stop(self) -> None:
        """End the run (from any thread; before :meth:`run` has started its vCPUs too):
        reason ``stopped``, unless the run already ended another way."""
        self._stopped = True
        if self.ctx.stop_request is None:
            self.ctx.stop_request = ("stopped", "stopped by the caller (Machine.stop)")
        stop_all = self._stop_all
        if stop_all is not None:
            stop_all()
        self.gate.resume()

    def pause(self, *, timeout: float = 10.0) -> None:
        """Park every vCPU at its next exit; returns once none is in ``KVM_RUN``.
        Pauses nest: the vCPUs run again after as many :meth:`resume` calls as there
        were pauses (so a :meth:`snapshot` taken while the caller holds a pause leaves
        the guest paused), whichever threads make them.
        :class:`MachineEndedError` if the run has ended (a vCPU's loop returned)."""
        with self._pause_lock:
            if self._pauses:
                self._pauses += 1
                return
            paused = self.gate.pause(self.vcpus, timeout=timeout)
            if not paused or self.gate.ended:
                self.gate.resume()
                if paused:
                    raise MachineEndedError("the guest's run ended before its vCPUs were paused")
                raise RunnerError(f"the vCPUs did not pause within {timeout:g} s")
            self._pauses = 1

    def resume(self) -> None:
        """Undo one :meth:`pause`; the vCPUs run again once none is left (a resume
        without a pause does nothing)."""
        with self._pause_lock:
            if self._pauses > 1:
                self._pauses -= 1
                return
            self._pauses = 0
            self.gate.resume()

    def _resume_all(self) -> None:
        """Drop every pause (the run is over, or stopped)."""
        with self._pause_lock:
            self._pauses = 0
            self.gate.resume()

    def _dirty_ring_full(self, vcpu: Any) -> None:
        if self._collecting:
            time.sleep(0.001)  # the migration's collector harvests and resets
            return
        with self._ring_lock:
            if not self._collecting:
                vcpu.dirty_ring().harvest()
                self.vm.reset_dirty_rings()

    # ---- snapshot and migration ---------------------------------------------------------
    def snapshot(self, path: str | Path, *, resume: bool = True, overwrite: bool = False) -> Path:
        """Pause every vCPU, write a snapshot directory at ``path`` (the format of
        :mod:`kvmkit.runner.snapshot`), then resume (unless ``resume`` is False)."""
        from kvmkit.runner.snapshot import capture_state, write_snapshot

        self.pause()
        try:
            vcpus, vm_state = capture_state(self.vm)
            return write_snapshot(
                path,
                vcpus=vcpus,
                vm=vm_state,
                memory=self.vm.regions,  # type: ignore[arg-type]
                devices=self.save_devices(),
                machine=self.settings(),
                overwrite=overwrite,
            )
        finally:
            if resume:
                self.resume()

    def migrate(
        self,
        address: str,
        *,
        downtime_ms: float = 50.0,
        max_rounds: int = 30,
        timeout: float = 10.0,
        progress: Callable[[int, int], None] | None = None,
    ) -> Any:
        """Live-migrate this running machine to the destination listening at ``address``
        (``kvmkit run --incoming``).  Returns :class:`MigrationStats` once the destination
        has taken over; the vCPUs here then stay paused (:meth:`stop` ends the run).  On
        any failure the vCPUs resume and :class:`MigrationError` says why."""
        from kvmkit.runner.migration import (
            BitmapDirtySource,
            MigratedState,
            MigrationError,
            RingDirtySource,
            connect,
            send_vm,
        )

        source = _LockedSource(
            RingDirtySource(self.vm) if self.vm.dirty_ring_entries else BitmapDirtySource(self.vm),
            self._ring_lock,
        )
        paused = False

        def pause() -> None:
            nonlocal paused
            self.pause()
            paused = True

        def state() -> bytes:
            from kvmkit.runner.snapshot import capture_state

            vcpus, vm_state = capture_state(self.vm)
            return MigratedState(vcpus, vm_state, self.save_devices(), self.settings()).to_bytes()

        sock = connect(address, timeout=timeout)
        self._collecting = True
        try:
            stats = send_vm(
                sock,
                self.vm,
                source,
                pause=pause,
                state=state,
                downtime_ms=downtime_ms,
                max_rounds=max_rounds,
                progress=progress,
                machine=self.settings(),
            )
        except MigrationError:
            if paused:
                self.resume()
            raise
        except RunnerError as exc:
            if paused:
                self.resume()
            raise MigrationError(f"migration failed on the source: {exc}") from exc
        finally:
            self._collecting = False
            sock.close()
        return stats

    @classmethod
    def incoming(
        cls,
        address: str,
        *,
        kvm: Kvm,
        echo: TextIO | None = sys.stdout,
        console_limit: int = DEFAULT_CONSOLE_LIMIT,
        timeout: float = 60.0,
        ready: Callable[[], None] | None = None,
    ) -> tuple[Machine, Any]:
        """Listen at ``address``, receive one migrating machine and return it ready to
        :meth:`run`, with the receiver's statistics.  Any failure is a
        :class:`MigrationError` (the source was told and resumes); nothing runs."""
        from kvmkit.runner.migration import (
            MigratedState,
            ProtocolError,
            accept,
            add_layout_memory,
            listen,
            receive_vm,
        )

        box: dict[str, Machine] = {}

        def configure(m: Machine, settings: dict[str, Any]) -> None:
            """Build the machine ``settings`` describe on ``m``'s VM (memory in place)."""
            config, kind, mode = _config_from_settings(settings, echo=echo, error=ProtocolError)
            m.config, m.kind, m.mode = config, kind, mode
            m._add_platform(write_tables=False)  # they come with the guest's memory
            m.vcpus = [m.vm.create_vcpu(i) for i in range(config.vcpus)]

        def prepare(layout: Any) -> Vm:
            vm = kvm.create_vm()
            placeholder = RunConfig(image=Path("incoming"), vcpus=layout.vcpu_count, echo=echo)
            m = box["m"] = cls(placeholder, kvm, vm, Console(echo, limit=console_limit))
            add_layout_memory(vm, layout)
            if layout.machine:  # build it now, while the pages flow, not in the downtime
                configure(m, layout.machine)
                if m.config.vcpus != layout.vcpu_count:
                    raise ProtocolError("the stream's vCPU count is not its machine's")
            return vm

        def apply(vm: Vm, blob: bytes) -> None:
            st = MigratedState.from_bytes(blob)
            m = box["m"]
            if m.bus is None:
                configure(m, st.machine)
            elif st.machine != m.settings():
                raise ProtocolError("the migrated state's machine is not the one its hello named")
            if m.config.vcpus != len(st.vcpus):
                raise ProtocolError("the migrated state's vCPU count is not its machine's")
            m.vcpus = st.apply(vm)
            m.load_devices(st.devices, ProtocolError)

        listener = listen(address)
        try:
            if ready is not None:
                ready()
            conn = accept(listener, timeout=timeout)
        finally:
            listener.close()
            _unlink_unix(address)
        try:
            stats = receive_vm(conn, prepare, apply)
        except BaseException:
            if "m" in box:
                box["m"].close()
            raise
        finally:
            conn.close()
        return box["m"], stats

    def close(self) -> None:
        """Stop the platform's timers, close the caller's port devices that have a
        ``close()`` (before their VM), then the VM."""
        if self.platform is not None:
            self.platform.close()
            self.platform = None
        if self.bus is not None:
            for base, _count, _make in self.config.port_devices:
                getattr(self.bus.port_device(base), "close", lambda: None)()
            self.bus = None
        self.vm.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _LockedSource:
    """A dirty source whose harvests hold the machine's ring lock (so a vCPU thread
    never harvests the same ring at the same time)."""

    def __init__(self, inner: Any, lock: threading.Lock) -> None:
        self.inner = inner
        self.lock = lock

    def start(self) -> None:
        with self.lock:
            self.inner.start()

    def collect(self) -> list[tuple[int, int]]:
        with self.lock:
            return self.inner.collect()  # type: ignore[no-any-return]


def _max_ring_entries(vm: Vm) -> int:
    limit = vm.check_extension(Cap.DIRTY_LOG_RING_ACQ_REL) or vm.check_extension(Cap.DIRTY_LOG_RING)
    return max(int(limit) // 16, 0)


def _unlink_unix(address: str) -> None:
    if address.startswith("unix:"):
        with contextlib.suppress(OSError):
            Path(address[5:]).unlink()
