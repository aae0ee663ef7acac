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
124 timeout; 125 crash; 130 interrupted.
"""

from __future__ import annotations

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
from kvmkit.runner.errors import ImageError, RunnerError
from kvmkit.runner.irq import IrqChipLines
from kvmkit.runner.loaders.layout import (
    KVM_IDENTITY_MAP_ADDR,
    KVM_TSS_ADDR,
    amd_ht_hole,
    e820_map,
    find_free,
    pc_ram_layout,
)
from kvmkit.runner.loop import Outcome, VcpuLoop
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

    reason: str  # exit | halt | reset | poweroff | timeout | crash | interrupted | error
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


def _add_ram(vm: Vm, config: RunConfig) -> None:
    for base, size in pc_ram_layout(config.mem_size).regions:
        vm.add_memory(base, size, hugepages=config.hugepages, backing=config.mem_path)


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
        if all(p not in bus.ports for p in range(base, base + count)):
            bus.register_ports(base, count, make_std())
    return bus


def run_guest(config: RunConfig, *, kvm: Kvm | None = None) -> RunResult:
    """Load ``config.image`` into a fresh VM and run it to the end.

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
            result = _boot(config, kvm, boot, console, deadline)
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
    config: RunConfig, kvm: Kvm, plan: _Boot, console: Console, deadline: float | None
) -> RunResult:
    """One boot: a fresh VM with the image placed in it, run until it ends."""
    from kvmkit.runner.loaders import place

    image, mode = plan.image, plan.mode
    with kvm.create_vm() as vm:
        _add_ram(vm, config)
        if config.irqchip:  # before any vCPU, whatever their number
            vm.create_irqchip()
            vm.create_pit2()
        vm.set_tss_addr(KVM_TSS_ADDR)  # as QEMU: reported reserved in the e820 map
        if kvm.check_extension(Cap.SET_IDENTITY_MAP_ADDR):
            vm.set_identity_map_addr(KVM_IDENTITY_MAP_ADDR)
        place(image, vm)
        irq = IrqChipLines(vm) if config.irqchip else None
        ctx = RunContext(vm, console=console, irq=irq)
        bus = build_bus(
            ctx, mem_size=config.mem_size, vcpus=config.vcpus, port_devices=config.port_devices
        )
        platform = install_pc_platform(
            bus,
            vm,
            ctx.irq,
            mem_size=config.mem_size,
            vcpus=config.vcpus,
            devices=config.devices,
            on_reset=ctx.request_reset,
            on_poweroff=lambda: ctx.request_poweroff("ACPI S5 (PM1a control)"),
        )
        vcpus = [vm.create_vcpu(i) for i in range(config.vcpus)]
        boot = vcpus[0]
        setup_mode(
            boot,
            mode,
            entry=image.entry,
            stack=plan.stack_top,
            cpl=config.cpl,
            tables_at=plan.tables_at,
        )
        if plan.mb_plan is not None:
            regs = boot.get_regs()
            regs.rax, regs.rbx = MULTIBOOT_BOOTLOADER_MAGIC, plan.mb_plan.write(vm)
            boot.set_regs(regs)
        for i, vcpu in enumerate(vcpus):
            vcpu.set_cpuid2(
                plan.cpu_model.cpuid(kvm, vcpu_index=i, vcpus=config.vcpus, irqchip=vm.has_irqchip)
            )
        feeding = threading.Event()
        feeder = None
        uart = bus.ports.get(COM1_PORT)
        if config.stdin_fd is not None and isinstance(uart, Uart8250):
            feeder = forward_input(uart, config.stdin_fd, feeding)
        try:
            return _run_vcpus(config, ctx, bus, vcpus, image.kind, mode, deadline)
        finally:
            platform.close()
            for base, _count, _make in config.port_devices:  # yours, before the VM goes
                getattr(bus.ports.get(base), "close", lambda: None)()
            feeding.set()
            if feeder is not None:
                feeder.join()


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
) -> RunResult:
    stopping = threading.Event()
    loops = [VcpuLoop(v, bus, ctx, stopping, strict=config.strict) for v in vcpus]
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
        if outcomes[i] is not None and outcomes[i].kind != "stopped":  # type: ignore[union-attr]
            stop_all()

    start = time.monotonic()
    threads = [
        threading.Thread(target=body, args=(i,), name=f"vcpu{i}", daemon=True)
        for i in range(len(vcpus))
    ]
    for t in threads:
        t.start()
    reason_override: str | None = None
    try:
        reason_override = _wait_for_end(loops, finished, deadline, watch=config.irqchip)
    except KeyboardInterrupt:
        reason_override = "interrupted"
    if reason_override:
        stop_all()
    for t in threads:
        while t.is_alive():
            t.join(timeout=0.5)
            if t.is_alive():  # a vCPU still blocked (e.g. an AP waiting for SIPI)
                for v in vcpus:
                    v.kick()
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
