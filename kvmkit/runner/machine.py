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
from kvmkit.kvm.caps import Cap
from kvmkit.kvm.modes import DEFAULT_TABLES_AT, TABLES_SIZE, Mode, setup_mode
from kvmkit.runner.bus import Bus
from kvmkit.runner.context import RunContext
from kvmkit.runner.devices import DebugConsole, DebugExit, FwCfg, Hypercalls, Uart8250
from kvmkit.runner.devices.debugcon import DEBUGCON_PORT
from kvmkit.runner.devices.debugexit import DEBUG_EXIT_PORT
from kvmkit.runner.devices.fwcfg import FW_CFG_PORT_SEL
from kvmkit.runner.devices.hypercalls import HYPERCALL_BASE, HYPERCALL_COUNT
from kvmkit.runner.devices.uart import COM1_PORT
from kvmkit.runner.errors import ImageError, RunnerError
from kvmkit.runner.loaders.layout import (
    KVM_IDENTITY_MAP_ADDR,
    KVM_TSS_ADDR,
    amd_ht_hole,
    e820_map,
    find_free,
    pc_ram_layout,
)
from kvmkit.runner.loop import Outcome, VcpuLoop
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
    from kvmkit.runner.cpu import parse_cpu_model
    from kvmkit.runner.loaders import Module, load_image, place, plan_multiboot_info

    if not 1 <= config.vcpus <= 255:
        raise RunnerError(f"--vcpus {config.vcpus}: give 1 to 255")
    if config.cpl not in (0, 3):
        raise RunnerError(f"--cpl {config.cpl}: give 0 or 3")
    check_mem_size(config.mem_size)
    cpu_model = parse_cpu_model(config.cpu)
    low_ram = pc_ram_layout(config.mem_size).below_4g
    image = load_image(
        config.image,
        ram_size=low_ram,
        load_addr=config.load_addr,
        flat_mode=config.mode or Mode.LONG,
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

    own_kvm = kvm is None
    kvm = kvm or Kvm()
    try:
        # A feature this KVM cannot give fails before any memory is mapped (what needs
        # the irqchip is checked again below, against the VM as built).
        cpu_model.cpuid(kvm, vcpu_index=0, vcpus=config.vcpus, irqchip=True)
        occupied = [(s.addr, s.end) for s in image.segments if s.memsz]
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
        with kvm.create_vm() as vm:
            _add_ram(vm, config)
            if config.vcpus > 1:
                vm.create_irqchip()  # LAPICs: INIT/SIPI and IPIs between vCPUs
            vm.set_tss_addr(KVM_TSS_ADDR)  # as QEMU: reported reserved in the e820 map
            if kvm.check_extension(Cap.SET_IDENTITY_MAP_ADDR):
                vm.set_identity_map_addr(KVM_IDENTITY_MAP_ADDR)
            place(image, vm)
            ctx = RunContext(vm, echo=config.echo)
            bus = build_bus(ctx, mem_size=config.mem_size, vcpus=config.vcpus)
            vcpus = [vm.create_vcpu(i) for i in range(config.vcpus)]
            boot = vcpus[0]
            setup_mode(
                boot, mode, entry=image.entry, stack=stack_top, cpl=config.cpl, tables_at=tables_at
            )
            if mb_plan is not None:
                regs = boot.get_regs()
                regs.rax, regs.rbx = MULTIBOOT_BOOTLOADER_MAGIC, mb_plan.write(vm)
                boot.set_regs(regs)
            for i, vcpu in enumerate(vcpus):
                vcpu.set_cpuid2(
                    cpu_model.cpuid(kvm, vcpu_index=i, vcpus=config.vcpus, irqchip=vm.has_irqchip)
                )
            return _run_vcpus(config, ctx, bus, vcpus, image.kind, mode)
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
