"""``kvmkit demo``: the whole teaching demo, step by step, each with a line of explanation
first.  A step this host cannot run (no /dev/kvm, no QEMU) is skipped with the reason and
the rest still runs.  ``report`` writes the Markdown/PNG/JSON report of what was measured."""

from __future__ import annotations

import os
import shutil
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from kvmkit.demos.progress import Progress


@dataclass
class DemoOptions:
    quick: bool = False
    report: Path | None = None
    linux: bool = True


def _no_kvm() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "this host has no /dev/kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible to this user (add yourself to the kvm group)"
    return None


def _no_qemu() -> str | None:
    return None if shutil.which("qemu-system-x86_64") else "qemu-system-x86_64 is not installed"


def run_demo(options: DemoOptions, out: TextIO = sys.stdout) -> dict[str, Any]:
    """Run every step; return the figures (what the report is made from)."""
    p = Progress(out)
    figures: dict[str, Any] = {"quick": options.quick, "skipped": {}}

    def skipped(step: str, reason: str) -> None:
        p.skip(reason)
        figures["skipped"][step] = reason

    def failed(step: str, exc: BaseException) -> None:
        skipped(step, f"failed: {type(exc).__name__}: {exc}")
        if os.environ.get("KVMKIT_DEMO_DEBUG"):
            traceback.print_exc()

    # 1 ------------------------------------------------------------------------------
    p.step(
        1,
        "what this host offers",
        "KVM is the Linux kernel's hypervisor; /dev/kvm is its door. What the guest's code "
        "runs on depends on the backend behind it: VT-x or AMD-V run guest code on the CPU "
        "itself; PVM, used where the CPU has no virtualization extensions, runs user-mode "
        "guest code natively but emulates guest kernel code.",
    )
    if reason := _no_kvm():
        skipped("host", reason)
    else:
        from kvmkit.kvm.info import format_info, host_info

        info = host_info()
        figures["host"] = info
        p.say("  " + format_info(info).replace("\n", "\n  "))

    # 2 ------------------------------------------------------------------------------
    p.step(
        2,
        "the same guest, four ways",
        "One multiboot image, 'compute', counts primes with a sieve. We run it under kvmkit's "
        "own minimal VMM at CPL 3 (user mode) and at CPL 0 (kernel mode), and under QEMU with "
        "KVM (hardware-assisted) and with TCG (QEMU translates every instruction: full "
        "emulation). Each engine gets a workload big enough to time; compare throughput.",
    )
    if _no_kvm() and _no_qemu():
        skipped("engines", "neither /dev/kvm nor QEMU is available")
    else:
        from kvmkit.demos.engines import compare_engines, format_engines

        try:
            with p.task("running compute under four engines"):
                runs = compare_engines(target_s=0.2 if options.quick else 0.5)
            figures["engines"] = [r.to_json() for r in runs]
            p.say(format_engines(runs))
            p.say(
                "  Read it: CPL-3 code under KVM runs at the CPU's own speed, like QEMU+KVM; "
                "TCG pays for translating each instruction; on a PVM host CPL-0 code is "
                "emulated by KVM one instruction at a time."
            )
        except Exception as exc:
            failed("engines", exc)

    # 3 ------------------------------------------------------------------------------
    p.step(
        3,
        "the anatomy of a VM exit",
        "A guest that touches an I/O port or an unbacked address leaves the CPU: KVM_RUN "
        "returns to the VMM, which answers and re-enters. 'io-storm' and 'mmio-storm' do "
        "that thousands of times; the runner times every KVM_RUN, so each exit's cost splits "
        "into time inside KVM_RUN (guest, world switch, KVM in the kernel) and time in the "
        "VMM (kvmkit itself), with the C fast path and with the pure Python loop.",
    )
    if reason := _no_kvm():
        skipped("exits", reason)
    else:
        from kvmkit.demos.exits import format_exit_costs, measure_exit_costs

        try:
            with p.task("running io-storm and mmio-storm"):
                costs = measure_exit_costs(2000 if options.quick else 20000)
            figures["exits"] = [c.to_json() for c in costs]
            p.say(format_exit_costs(costs))
        except Exception as exc:
            failed("exits", exc)

    # 4 ------------------------------------------------------------------------------
    p.step(
        4,
        "a full Linux guest under QEMU, driven over QMP",
        "Now a real Linux kernel with a busybox userland. kvmkit starts QEMU, talks to it over "
        "the QEMU Machine Protocol, hot-plugs a disk the guest then finds in /sys/block, and "
        "live-migrates the running guest to a second QEMU while a counter keeps ticking.",
    )
    if not options.linux:
        skipped("linux", "not requested (--no-linux)")
    elif reason := _no_qemu():
        skipped("linux", reason)
    else:
        import trio

        from kvmkit.demos.linux import linux_demo

        try:
            figures["linux"] = trio.run(linux_demo, lambda line: p.say("  " + line))
        except Exception as exc:
            failed("linux", exc)

    # 5 ------------------------------------------------------------------------------
    from kvmkit.demos import containers

    p.step(5, "VMs and containers", containers.EXPLANATION)
    try:
        figures["containers"] = containers.containers_step(
            p.say, p.task, report=options.report, quick=options.quick
        )
    except Exception as exc:
        failed("containers", exc)

    if options.report is not None:
        from kvmkit.demos.report import write_report

        path = write_report(figures, options.report)
        p.say(f"\nreport written to {path}")
    return figures
