"""``kvmkit run IMAGE``: run a guest image under kvmkit's minimal VM runner.

Every VM has the in-kernel interrupt controllers (PIC, IOAPIC, LAPICs) and PIT, so HLT
waits for an interrupt; --no-irqchip gives the bare one-vCPU machine where HLT ends the run.
When stdin is a terminal or a pipe, its bytes go to the serial port (COM1, IRQ 4).

Exit status: the guest's exit value (port 0xf4 or the exit hypercall) when it is 0-255,
255 for a larger one (--json has it whole); 0 when it halted for good (HLT on the bare
machine; with the irqchip, every vCPU halted with interrupts off), reset (without
--reboot) or powered off; 2 for an image that cannot be loaded; 124 on --timeout; 125
when the guest crashed (triple fault) or KVM could not run it; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from kvmkit.sizes import size_arg

DEFAULT_CONSOLE_LIMIT = 1 << 20

#: vCPUs the runner gives a guest (8-bit xAPIC ids, as the in-kernel irqchip numbers them).
MAX_VCPUS = 255
#: Pre-copy rounds ``--max-rounds`` may ask for.
MAX_ROUNDS = 10_000
#: Highest address ``--load-addr`` may name (52-bit guest-physical space).
MAX_ADDRESS = (1 << 52) - 1


def _seconds(text: str) -> float:
    """A finite, positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number of seconds above 0")
    return value


def _whole(text: str, low: int, high: int, what: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{value}: give {low} to {high} {what}")
    return value


def _vcpu_count(text: str) -> int:
    return _whole(text, 1, MAX_VCPUS, "vCPUs")


def _round_count(text: str) -> int:
    return _whole(text, 1, MAX_ROUNDS, "pre-copy rounds")


def _address(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an address: {text!r} (e.g. 0x100000)") from None
    if not 0 <= value <= MAX_ADDRESS:
        raise argparse.ArgumentTypeError(f"{text}: give an address from 0 to {MAX_ADDRESS:#x}")
    return value


def _one_line_error(prog: str) -> Callable[[str], NoReturn]:
    """Argparse's ``error`` without the usage block: bad input gets one line."""

    def error(message: str) -> NoReturn:
        print(f"{prog}: error: {message} (see {prog} --help)", file=sys.stderr)
        raise SystemExit(2)

    return error


def register(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run a guest image (flat, ELF32/64, multiboot) under kvmkit's minimal VM runner",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "image",
        nargs="?",
        help="guest image, or the name of a bundled guest program (hello, compute, ...)",
    )
    p.add_argument(
        "--mode", choices=["real", "protected", "long"], help="start mode (default: the image's)"
    )
    p.add_argument("--cpl", type=int, choices=[0, 3], default=0, help="privilege level to start at")
    p.add_argument(
        "--mem",
        type=size_arg("B", minimum=2 << 20),
        default=64 << 20,
        metavar="SIZE",
        help="guest RAM (default 64M)",
    )
    p.add_argument(
        "--vcpus", type=_vcpu_count, default=1, help="number of vCPUs (SMP via INIT/SIPI)"
    )
    p.add_argument("--timeout", type=_seconds, metavar="S", help="kick every vCPU after S seconds")
    p.add_argument(
        "--cpu",
        default="host",
        metavar="MODEL",
        help="CPU model as QEMU's -cpu: host (what KVM offers), with +feature/-feature "
        "(e.g. host,+x2apic,-pku)",
    )
    p.add_argument(
        "--hugepages",
        action="store_true",
        help="back guest RAM with explicit huge pages (default: transparent huge pages)",
    )
    p.add_argument(
        "--mem-path",
        type=Path,
        metavar="DIR",
        help="back guest RAM with a file in DIR, e.g. a hugetlbfs mount (QEMU's -mem-path)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="an access to an unclaimed port/MMIO address is an error",
    )
    p.add_argument("--stats", action="store_true", help="print exit statistics to stderr")
    p.add_argument(
        "--json", action="store_true", help="print the result and statistics as JSON on stdout"
    )
    p.add_argument(
        "--python-loop", action="store_true", help="dispatch every exit in Python (no C fast path)"
    )
    p.add_argument(
        "--append", default="", help='multiboot command line (the guest sees "<image-name> ARGS")'
    )
    p.add_argument(
        "--module",
        action="append",
        default=[],
        metavar="FILE",
        help="multiboot module (repeatable)",
    )
    p.add_argument(
        "--device",
        action="append",
        default=[],
        choices=["pc-testdev", "pci-testdev"],
        help="add one of QEMU's test devices (repeatable; off by default, as in QEMU)",
    )
    p.add_argument("--load-addr", type=_address, help="load address of a flat binary")
    p.add_argument(
        "--no-irqchip",
        action="store_true",
        help="no in-kernel PIC/IOAPIC/LAPIC/PIT: one vCPU, HLT exits to the VMM and ends the run",
    )
    p.add_argument(
        "--reboot",
        action="store_true",
        help="restart the guest when it resets the machine or triple-faults "
        "(default: end the run, as QEMU's -no-reboot)",
    )
    p.add_argument(
        "--console-limit",
        type=size_arg("B"),
        default=DEFAULT_CONSOLE_LIMIT,
        metavar="SIZE",
        help="console bytes kept for --json (the last ones; default 1M); the stream gets all",
    )
    snap = p.add_argument_group("snapshot and live migration")
    snap.add_argument(
        "--snapshot", type=Path, metavar="DIR", help="write a snapshot to DIR (--snapshot-after)"
    )
    snap.add_argument(
        "--snapshot-after",
        type=_seconds,
        metavar="S",
        help="pause every vCPU S seconds into the run, write the snapshot and exit 0",
    )
    snap.add_argument(
        "--incoming",
        metavar="ADDR",
        help="wait for a migrating VM on ADDR (tcp:HOST:PORT or unix:PATH) and run it",
    )
    snap.add_argument(
        "--incoming-timeout",
        type=_seconds,
        default=60.0,
        metavar="S",
        help="how long --incoming waits for the source (default 60)",
    )
    snap.add_argument(
        "--migrate-to", metavar="ADDR", help="live-migrate the guest to ADDR (--migrate-after)"
    )
    snap.add_argument(
        "--migrate-after", type=_seconds, metavar="S", help="start the migration after S seconds"
    )
    snap.add_argument(
        "--downtime-ms",
        type=_seconds,
        default=50.0,
        metavar="MS",
        help="pre-copy until the rest fits this downtime (default 50)",
    )
    snap.add_argument(
        "--max-rounds", type=_round_count, default=30, metavar="N", help="pre-copy rounds at most"
    )
    p.set_defaults(func=run)
    p.error = _one_line_error(p.prog)


def _resolve_image(name: str) -> Path:
    path = Path(name)
    if path.exists() or "/" in name:
        return path
    from kvmkit import guests

    if name in guests.GUEST_NAMES:
        return guests.build_guest(name)
    return path  # the loader reports the missing file


def _forwardable_stdin() -> int | None:
    """Fd 0 when it is a pipe, or a terminal whose foreground we are (reading a terminal
    from the background would stop the whole process with SIGTTIN), else None."""
    try:
        mode = os.fstat(0).st_mode
        if os.isatty(0):
            return 0 if os.tcgetpgrp(0) == os.getpgrp() else None
    except OSError:
        return None
    return 0 if stat.S_ISFIFO(mode) else None


def _check_combinations(args: argparse.Namespace) -> None:
    error = _one_line_error("kvmkit run")
    if args.incoming:
        if args.image or args.snapshot or args.migrate_to:
            error("--incoming takes no IMAGE, --snapshot or --migrate-to: the VM comes from ADDR")
        return
    if not args.image:
        error("give an IMAGE (or --incoming ADDR)")
    if (args.snapshot is None) != (args.snapshot_after is None):
        error("--snapshot DIR and --snapshot-after S go together")
    if (args.migrate_to is None) != (args.migrate_after is None):
        error("--migrate-to ADDR and --migrate-after S go together")
    if args.snapshot and args.migrate_to:
        error("--snapshot and --migrate-to: pick one")
    if args.snapshot and args.snapshot.exists():
        error(f"--snapshot {args.snapshot}: it already exists; pick a new directory")
    if args.migrate_to:
        from kvmkit.runner.migration import parse_address

        parse_address(args.migrate_to)  # a bad address fails before the guest starts


def run(args: argparse.Namespace) -> int:
    from kvmkit.kvm.modes import Mode
    from kvmkit.runner.machine import RunConfig, run_guest

    _check_combinations(args)
    if args.incoming:
        from kvmkit.commands.restore import run_incoming

        return run_incoming(args)
    config = RunConfig(
        image=_resolve_image(args.image),
        mode=Mode(args.mode) if args.mode else None,
        cpl=args.cpl,
        mem_size=args.mem,
        vcpus=args.vcpus,
        timeout=args.timeout,
        strict=args.strict,
        python_loop=args.python_loop,
        append=args.append,
        modules=[Path(m) for m in args.module],
        load_addr=args.load_addr,
        devices=args.device,
        cpu=args.cpu,
        hugepages=args.hugepages,
        mem_path=args.mem_path,
        echo=sys.stderr if args.json else sys.stdout,  # with --json, stdout is the JSON
        irqchip=not args.no_irqchip,
        reboot=args.reboot,
        console_limit=args.console_limit,
        stdin_fd=_forwardable_stdin(),
    )
    action: tuple[float, Callable[[Any], tuple[str, str] | None]] | None = None
    migration: dict[str, Any] = {}
    if args.snapshot:
        action = (args.snapshot_after, _snapshot_action(args.snapshot))
    elif args.migrate_to:
        action = (args.migrate_after, _migrate_action(args, migration))
    result = run_guest(config, action=action, dirty_tracking=bool(args.migrate_to))
    try:
        report(args, result, migration)
    except BrokenPipeError:  # stdout went away: the run's own status still stands
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return result.process_status


def _snapshot_action(path: Path) -> Callable[[Any], tuple[str, str] | None]:
    def act(machine: Any) -> tuple[str, str] | None:
        from kvmkit.runner.errors import MachineEndedError

        try:
            machine.snapshot(path, resume=False)
        except MachineEndedError:
            return None  # the guest ended at that very moment: reported as "before"
        return "snapshot", f"snapshot written to {path} (restore it with: kvmkit restore {path})"

    return act


def _migrate_action(
    args: argparse.Namespace, out: dict[str, Any]
) -> Callable[[Any], tuple[str, str] | None]:
    """Migrate when called; on success end the run (``migrated``), on failure note why
    in ``out`` and let the guest run on here."""

    def act(machine: Any) -> tuple[str, str] | None:
        from kvmkit.runner.migration import MigrationError
        from kvmkit.ui import err_console

        try:
            with _migration_progress(args.migrate_to) as progress:
                stats = machine.migrate(
                    args.migrate_to,
                    downtime_ms=args.downtime_ms,
                    max_rounds=args.max_rounds,
                    progress=progress,
                )
        except MigrationError as exc:
            out["error"] = str(exc)
            err_console.print(
                f"kvmkit run: migration failed, the guest keeps running here: {exc}",
                markup=False,
                highlight=False,
            )
            return None
        out.update(stats.to_dict())
        return "migrated", (
            f"migrated to {args.migrate_to} in {stats.total_s * 1000:.1f} ms "
            f"({len(stats.rounds)} rounds, downtime {stats.downtime_s * 1000:.1f} ms)"
        )

    return act


@contextlib.contextmanager
def _migration_progress(addr: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress line (on a terminal) fed ``(round, pages)`` by the sender."""
    from kvmkit.ui import progress

    sent = [0]
    with progress(f"migrating to {addr}") as advance:

        def update(rnd: int, pages: int) -> None:
            sent[0] += pages
            advance(
                0,
                description=f"migrating to {addr}: round {rnd}, {pages} pages "
                f"({sent[0] * 4096 >> 20} MiB sent)",
            )

        yield update


def report(args: argparse.Namespace, result: Any, migration: dict[str, Any] | None = None) -> None:
    """Print a run's result as ``kvmkit run`` does (also used by ``kvmkit restore``)."""
    if args.json:
        doc = result.to_json()
        if migration:
            doc["migration"] = migration
        print(json.dumps(doc, indent=2))
    else:
        sys.stdout.flush()
        if result.reason in ("snapshot", "migrated"):
            print(f"kvmkit run: {result.detail}", file=sys.stderr)
        elif result.reason not in ("exit", "halt", "poweroff"):
            print(f"kvmkit run: {result.reason}: {result.detail}", file=sys.stderr)
            for state in result.vcpu_states:
                if state:
                    print(
                        f"  vcpu {state['vcpu']}: {state['mode']} mode, CPL {state['cpl']}, RIP {state['rip']:#x}",
                        file=sys.stderr,
                    )
                    if result.reason == "crash":
                        print("  " + state["regs"].replace("\n", "\n  "), file=sys.stderr)
        moment = getattr(args, "snapshot", None) or getattr(args, "migrate_to", None)
        if moment and result.reason not in ("snapshot", "migrated"):
            what = "no snapshot was written" if args.snapshot else "it was not migrated"
            if not (migration or {}).get("error"):
                print(f"kvmkit run: the run ended before that moment: {what}", file=sys.stderr)
        if getattr(args, "stats", False):
            print(result.stats.format_table(), file=sys.stderr)
    sys.stdout.flush()
