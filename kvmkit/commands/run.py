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
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from kvmkit.sizes import size_arg

DEFAULT_CONSOLE_LIMIT = 1 << 20


def register(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run a guest image (flat, ELF32/64, multiboot) under kvmkit's minimal VM runner",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "image", help="guest image, or the name of a bundled guest program (hello, compute, ...)"
    )
    p.add_argument(
        "--mode", choices=["real", "protected", "long"], help="start mode (default: the image's)"
    )
    p.add_argument("--cpl", type=int, choices=[0, 3], default=0, help="privilege level to start at")
    p.add_argument(
        "--mem",
        type=size_arg("B"),
        default=64 << 20,
        metavar="SIZE",
        help="guest RAM (default 64M)",
    )
    p.add_argument("--vcpus", type=int, default=1, help="number of vCPUs (SMP via INIT/SIPI)")
    p.add_argument("--timeout", type=float, metavar="S", help="kick every vCPU after S seconds")
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
    p.add_argument("--load-addr", type=lambda s: int(s, 0), help="load address of a flat binary")
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
    p.set_defaults(func=run)


def _resolve_image(name: str) -> Path:
    path = Path(name)
    if path.exists() or "/" in name:
        return path
    from kvmkit import guests

    if name in guests.GUEST_NAMES:
        return guests.build_guest(name)
    return path  # the loader reports the missing file


def _forwardable_stdin() -> int | None:
    """fd 0 when it is a pipe, or a terminal whose foreground we are (reading a terminal
    from the background would stop the whole process with SIGTTIN), else None."""
    try:
        mode = os.fstat(0).st_mode
        if os.isatty(0):
            return 0 if os.tcgetpgrp(0) == os.getpgrp() else None
    except OSError:
        return None
    return 0 if stat.S_ISFIFO(mode) else None


def run(args: argparse.Namespace) -> int:
    from kvmkit.kvm.modes import Mode
    from kvmkit.runner.machine import RunConfig, run_guest

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
        echo=sys.stderr if args.json else sys.stdout,  # with --json, stdout is the JSON
        irqchip=not args.no_irqchip,
        reboot=args.reboot,
        console_limit=args.console_limit,
        stdin_fd=_forwardable_stdin(),
    )
    result = run_guest(config)
    try:
        _report(args, result)
    except BrokenPipeError:  # stdout went away: the run's own status still stands
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return result.process_status


def _report(args: argparse.Namespace, result: Any) -> None:
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        sys.stdout.flush()
        if result.reason not in ("exit", "halt", "poweroff"):
            print(f"kvmkit run: {result.reason}: {result.detail}", file=sys.stderr)
            for state in result.vcpu_states:
                if state:
                    print(
                        f"  vcpu {state['vcpu']}: {state['mode']} mode, CPL {state['cpl']}, RIP {state['rip']:#x}",
                        file=sys.stderr,
                    )
                    if result.reason == "crash":
                        print("  " + state["regs"].replace("\n", "\n  "), file=sys.stderr)
        if args.stats:
            print(result.stats.format_table(), file=sys.stderr)
    sys.stdout.flush()
