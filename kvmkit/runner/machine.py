"""``run_guest``: one call from an image file to a finished run — memory, loader, mode,
devices, one thread per vCPU, timeout, statistics.

Guest-physical layout (RAM starts at 0; above 3 GiB it continues at 4 GiB, leaving the
hole where the LAPIC, IOAPIC and MMIO devices live)::

    0x009000-0x00ffff  multiboot info block (multiboot images)
    0x020000-0x02afff  runner's GDT, IDT, TSS (+I/O bitmap), page tables (protected/long)
    0x070000-0x07ffff  initial stack (top 0x80000) for ELF and flat images
    0x0f0000-          ACPI tables (RSDP at 0xf0000; 676 bytes for 1 vCPU), see runner.platform
    0x100000-          the image (multiboot kernels load here)
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from kvmkit.errors import KvmkitError
from kvmkit.kvm import Kvm, Vm
from kvmkit.kvm.cpuid import with_apic_id
from kvmkit.kvm.modes import DEFAULT_TABLES_AT, TABLES_SIZE, Mode, setup_mode
from kvmkit.runner.bus import Bus
from kvmkit.runner.context import RunContext
from kvmkit.runner.devices import DebugConsole, DebugExit, FwCfg, Hypercalls, Uart8250
from kvmkit.runner.devices.acpi import acpi_tables_span
from kvmkit.runner.devices.debugcon import DEBUGCON_PORT
from kvmkit.runner.devices.debugexit import DEBUG_EXIT_PORT
from kvmkit.runner.devices.fwcfg import FW_CFG_PORT_SEL
from kvmkit.runner.devices.hypercalls import HYPERCALL_BASE, HYPERCALL_COUNT
from kvmkit.runner.devices.uart import COM1_PORT
from kvmkit.runner.errors import RunnerError
from kvmkit.runner.loop import Outcome, VcpuLoop
from kvmkit.runner.platform import KvmInterruptLines, install_pc_platform
from kvmkit.runner.stats import RunStats

MiB = 1 << 20
GiB = 1 << 30
LOW_RAM_LIMIT = 3 * GiB
HIGH_RAM_BASE = 4 * GiB
STACK_TOP = 0x80000
STACK_RESERVED = (0x70000, 0x80000)
MULTIBOOT_INFO_AT = 0x9000
TSS_ADDR = 0xFFFBD000  # VMX's real-mode TSS pages, where kvmtool and QEMU put them
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002

#: Process exit statuses of ``kvmkit run`` for endings other than the guest's own code.
STATUS_HALT = 0
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
    devices: Sequence[str] = ()  # optional platform devices: pc-testdev, pci-testdev
    echo: TextIO | None = field(default_factory=lambda: sys.stdout)


@dataclass
class RunResult:
    """How a run ended, what the guest printed, and the statistics."""

    reason: str  # exit | halt | timeout | crash | interrupted | error
    exit_code: int | None
    console: str
    stats: RunStats
    detail: str = ""
    vcpu_states: list[dict[str, Any]] = field(default_factory=list)
    image_kind: str = ""
    mode: str = ""
    cpl: int = 0
    loop: str = ""

    @property
    def process_status(self) -> int:
        """What ``kvmkit run`` exits with."""
        if self.reason == "exit":
            return int(self.exit_code or 0) & 0xFF
        return {
            "halt": STATUS_HALT,
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
        }
        out.update(self.stats.to_json())
        if self.detail:
            out["detail"] = self.detail
        if self.vcpu_states:
            out["vcpus"] = self.vcpu_states
        return out


def _add_ram(vm: Vm, size: int) -> None:
    if size < 2 * MiB or size % (4096):
        raise RunnerError(f"guest memory of {size} bytes: give at least 2 MiB, in whole pages")
    vm.add_memory(0, min(size, LOW_RAM_LIMIT))
    if size > LOW_RAM_LIMIT:
        vm.add_memory(HIGH_RAM_BASE, size - LOW_RAM_LIMIT)


def build_bus(ctx: RunContext, *, mem_size: int, vcpus: int) -> Bus:
    """The runner's standard devices on a fresh bus."""
    bus = Bus()
    bus.register_ports(DEBUGCON_PORT, 1, DebugConsole(ctx.console))
    bus.register_ports(DEBUG_EXIT_PORT, 4, DebugExit())
    bus.register_ports(COM1_PORT, 8, Uart8250(ctx.console))
    bus.register_ports(FW_CFG_PORT_SEL, 2, FwCfg(ram_size=mem_size, cpus=vcpus))
    bus.register_ports(HYPERCALL_BASE + 1, HYPERCALL_COUNT - 1, Hypercalls(ctx))
    return bus


def run_guest(config: RunConfig, *, kvm: Kvm | None = None) -> RunResult:
    """Load ``config.image`` into a fresh VM and run it to the end.

    Raises :class:`~kvmkit.runner.errors.ImageError` for an image that cannot be loaded
    and :class:`RunnerError` for an impossible configuration; how the guest itself ended
    (exit code, crash, timeout) is in the result, not an exception.
    """
    from kvmkit.runner.loaders import Module, build_multiboot_info, load_image, place

    if not 1 <= config.vcpus <= 255:
        raise RunnerError(f"--vcpus {config.vcpus}: give 1 to 255")
    if config.cpl not in (0, 3):
        raise RunnerError(f"--cpl {config.cpl}: give 0 or 3")
    reserved = [
        (DEFAULT_TABLES_AT, DEFAULT_TABLES_AT + TABLES_SIZE),
        STACK_RESERVED,
        acpi_tables_span(config.vcpus),  # the platform's ACPI tables (from 0xf0000)
    ]
    image = load_image(
        config.image,
        ram_size=min(config.mem_size, LOW_RAM_LIMIT),
        load_addr=config.load_addr,
        flat_mode=config.mode or Mode.LONG,
        reserved=reserved,
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

    own_kvm = kvm is None
    kvm = kvm or Kvm()
    try:
        with kvm.create_vm() as vm:
            _add_ram(vm, config.mem_size)
            vm.create_irqchip()  # PIC, IOAPIC, LAPICs, as every VMM does for any vCPU count
            vm.create_pit2()
            vm.set_tss_addr(TSS_ADDR)
            place(image, vm)
            ctx = RunContext(vm, echo=config.echo)
            bus = build_bus(ctx, mem_size=config.mem_size, vcpus=config.vcpus)
            platform = install_pc_platform(
                bus,
                vm,
                KvmInterruptLines(vm),
                mem_size=config.mem_size,
                vcpus=config.vcpus,
                devices=config.devices,
            )
            cpuid = kvm.supported_cpuid()
            vcpus = [vm.create_vcpu(i) for i in range(config.vcpus)]
            boot = vcpus[0]
            setup_mode(boot, mode, entry=image.entry, stack=STACK_TOP, cpl=config.cpl)
            if image.kind == "multiboot":
                cmdline = f"{config.image.name} {config.append}".rstrip()
                modules = [Module(Path(m), Path(m).name) for m in config.modules]
                info = build_multiboot_info(
                    vm,
                    image,
                    ram_size=config.mem_size,
                    cmdline=cmdline,
                    modules=modules,
                    info_addr=MULTIBOOT_INFO_AT,
                )
                regs = boot.get_regs()
                regs.rax, regs.rbx = MULTIBOOT_BOOTLOADER_MAGIC, info
                boot.set_regs(regs)
            elif config.modules or config.append:
                raise RunnerError("--module and --append only apply to multiboot images")
            for i, vcpu in enumerate(vcpus):
                vcpu.set_cpuid2(with_apic_id(cpuid, i))
            try:
                return _run_vcpus(config, ctx, bus, vcpus, image.kind, mode)
            finally:
                platform.close()
    finally:
        if own_kvm:
            kvm.close()


def _run_vcpus(
    config: RunConfig, ctx: RunContext, bus: Bus, vcpus: list[Any], kind: str, mode: Mode
) -> RunResult:
    stopping = threading.Event()
    loops = [VcpuLoop(v, bus, ctx, stopping, strict=config.strict) for v in vcpus]
    outcomes: list[Outcome | None] = [None] * len(vcpus)
    finished = threading.Event()

    def body(i: int) -> None:
        ctx.bind_vcpu_thread(i)
        loop = loops[i]
        try:
            outcomes[i] = loop.run_python() if config.python_loop else loop.run_fast()
        except BaseException as exc:  # never let a vCPU thread die silently
            outcomes[i] = Outcome("error", error=KvmkitError(f"vCPU {i} thread failed: {exc!r}"))
        if outcomes[i] is not None and outcomes[i].kind != "stopped":  # type: ignore[union-attr]
            stopping.set()
            finished.set()
            for other in vcpus:
                if other is not vcpus[i]:
                    other.kick()

    start = time.monotonic()
    threads = [
        threading.Thread(target=body, args=(i,), name=f"vcpu{i}", daemon=True)
        for i in range(len(vcpus))
    ]
    for t in threads:
        t.start()
    reason_override: str | None = None
    try:
        finished.wait(config.timeout)
        if not finished.is_set():
            reason_override = "timeout"
    except KeyboardInterrupt:
        reason_override = "interrupted"
    if reason_override:
        stopping.set()
    for v in vcpus:
        if reason_override:
            v.kick()
    for t in threads:
        while t.is_alive():
            t.join(timeout=0.5)
            if t.is_alive():  # a vCPU still blocked (e.g. an AP waiting for SIPI)
                for v in vcpus:
                    v.kick()
    wall = time.monotonic() - start
    stats = RunStats.merge([lp.stats for lp in loops], ctx.marks, wall)
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
    if reason_override:
        result.reason = reason_override
        result.detail = f"{reason_override} after {wall:.2f} s"
        result.vcpu_states = [lp.where() for lp in loops]
    elif ended:
        first = ended[0]
        if first.kind == "error" and first.error is not None:
            raise first.error
        result.reason, result.exit_code, result.detail = first.kind, first.code, first.detail
        if first.state:
            result.vcpu_states = [first.state]
    else:
        result.reason, result.detail = "error", "every vCPU stopped without a reason"
    return result
