"""``kvmkit demo``: the whole teaching demo, step by step, each with a line of explanation
first (``DemoOptions.steps`` / ``--steps`` picks steps by name: :data:`STEP_NAMES`).
A step this host cannot run (no /dev/kvm, no QEMU) is skipped with the reason; a
step that raises is FAILED with its error (``figures["failed"]``; ``kvmkit demo`` then
exits 1); either way the rest still runs.  ``report`` writes the Markdown/PNG/JSON report
of what was measured."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from kvmkit.demos.progress import Progress
from kvmkit.errors import KvmkitError

#: The steps, by name, in the order they run (``--steps`` picks from these).
STEP_NAMES: tuple[str, ...] = (
    "host",
    "engines",
    "exits",
    "linux",
    "containers",
    "io",
    "snapshots",
)


class UnknownStepError(KvmkitError):
    """``--steps`` named a step the demo does not have."""


def parse_steps(text: str) -> tuple[str, ...]:
    """``"containers,io"`` -> ``("containers", "io")``; raises UnknownStepError naming
    the unknown ones and the known ones."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in STEP_NAMES]
    if unknown or not names:
        raise UnknownStepError(
            f"unknown demo step(s): {', '.join(unknown) or '(none given)'}",
            hint=f"choose from {','.join(STEP_NAMES)}",
        )
    return names


@dataclass
class DemoOptions:
    """What ``kvmkit demo`` was asked for: quick mode, report folder, Linux guests, steps."""

    quick: bool = False
    report: Path | None = None
    linux: bool = True
    #: The steps to run (by name, from STEP_NAMES); None runs them all.
    steps: tuple[str, ...] | None = None

    def wants(self, step: str) -> bool:
        return self.steps is None or step in self.steps


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
    figures: dict[str, Any] = {"quick": options.quick, "skipped": {}, "failed": {}}

    def skipped(step: str, reason: str) -> None:
        p.skip(reason)
        figures["skipped"][step] = reason

    def failed(step: str, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"
        p.fail(error)
        figures["failed"][step] = error
        if os.environ.get("KVMKIT_DEMO_DEBUG"):
            traceback.print_exc()

    if options.wants("host"):
        _host_step(p, figures, skipped)
    if options.wants("engines"):
        _engines_step(p, options, figures, skipped, failed)
    if options.wants("exits"):
        _exits_step(p, options, figures, skipped, failed)
    if options.wants("linux"):
        _linux_step(p, options, figures, skipped, failed)
    if options.wants("containers"):
        from kvmkit.demos import containers

        p.step(5, "VMs and containers", containers.EXPLANATION)
        try:
            figures["containers"] = containers.containers_step(
                p.say, p.task, report=options.report, quick=options.quick
            )
        except Exception as exc:
            failed("containers", exc)
    if options.wants("io"):
        from kvmkit.demos import io

        p.step(6, "emulated and paravirtual I/O", io.EXPLANATION)
        try:
            figures["io"] = io.io_step(
                p.say, p.task, report=options.report, quick=options.quick, linux=options.linux
            )
        except Exception as exc:
            failed("io", exc)
    if options.wants("snapshots"):
        from kvmkit.demos import snapshots

        p.step(7, "snapshot, clone and live-migrate a running VM", snapshots.EXPLANATION)
        if reason := _no_kvm():
            skipped("snapshots", reason)
        else:
            try:
                figures["snapshots"] = snapshots.snapshots_step(
                    p.say, p.task, report=options.report, quick=options.quick
                )
            except Exception as exc:
                failed("snapshots", exc)

    if options.report is not None:
        from kvmkit.demos.report import write_report

        path = write_report(figures, options.report)
        p.say(f"\nreport written to {path}")
    return figures


def _host_step(p: Progress, figures: dict[str, Any], skipped: Callable[[str, str], None]) -> None:
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


def _engines_step(
    p: Progress,
    options: DemoOptions,
    figures: dict[str, Any],
    skipped: Callable[[str, str], None],
    failed: Callable[[str, BaseException], None],
) -> None:
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
        from kvmkit.demos.engines import ENGINE_COLUMNS, compare_engines, engine_rows

        try:
            with p.task("running compute under four engines"):
                runs = compare_engines(target_s=0.2 if options.quick else 0.5)
            figures["engines"] = [r.to_json() for r in runs]
            p.table(ENGINE_COLUMNS, engine_rows(runs), numeric=ENGINE_COLUMNS[1:])
            broken = [f"{r.engine}: {r.failed}" for r in runs if r.failed]
            if broken:
                raise RuntimeError("; ".join(broken))
            answers = sorted({r.answer for r in runs if r.skipped is None})
            p.say("  every engine computed: " + "; ".join(answers))
            p.say(
                "  Read it: CPL-3 code under KVM runs at the CPU's own speed, like QEMU+KVM; "
                "TCG pays for translating each instruction; on a PVM host CPL-0 code is "
                "emulated by KVM one instruction at a time."
            )
        except Exception as exc:
            failed("engines", exc)


def _exits_step(
    p: Progress,
    options: DemoOptions,
    figures: dict[str, Any],
    skipped: Callable[[str, str], None],
    failed: Callable[[str, BaseException], None],
) -> None:
    p.step(
        3,
        "the anatomy of a VM exit",
        "A guest that touches an I/O port or an unbacked address leaves the CPU: KVM_RUN "
        "returns to the VMM, which answers and re-enters. A tiny guest does that thousands "
        "of times between two marks of its own; the time between the marks, divided by the "
        "exits, is one exit's cost, with nothing else in it. Beside kvmkit's C fast path and "
        "Python loop stands the tightest loop there is, in raw C. Each figure is checked "
        "against whole processes with few and with many exits; where the two disagree by "
        "more than 10% the figure says UNRELIABLE and shows both.",
    )
    if reason := _no_kvm():
        skipped("exits", reason)
    else:
        from kvmkit.demos import exits

        try:
            with (
                p.task("timing exits: raw C, C fast path, Python loop"),
                tempfile.TemporaryDirectory(prefix="kvmkit-demo-exits-") as tmp,
            ):
                table = exits.measure(
                    list(exits.CASES)[:3],
                    n1=2000 if options.quick else 5000,
                    n2=12000 if options.quick else 55000,
                    repeats=1 if options.quick else 3,
                    workdir=Path(tmp),
                )
            figures["exits"] = table.to_json()
            p.table(exits.TABLE_COLUMNS, exits.table_rows(table))
        except Exception as exc:
            failed("exits", exc)


def _linux_step(
    p: Progress,
    options: DemoOptions,
    figures: dict[str, Any],
    skipped: Callable[[str, str], None],
    failed: Callable[[str, BaseException], None],
) -> None:
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
