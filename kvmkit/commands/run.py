"""``kvmkit run IMAGE``: run a guest image under kvmkit's minimal VM runner.

Exit status: the guest's exit code (port 0xf4 or the exit hypercall); 0 when it halted;
2 for an image that cannot be loaded; 124 on --timeout; 125 when the guest crashed
(triple fault) or KVM could not run it; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kvmkit.errors import KvmkitError


def parse_size(text: str) -> int:
    """``64M``, ``1G``, ``512K`` or a number of bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64M or 1G)") from None


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
        "--mem", type=parse_size, default=64 << 20, metavar="SIZE", help="guest RAM (default 64M)"
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
    p.add_argument(
        "--device",
        action="append",
        default=[],
        choices=["pc-testdev", "pci-testdev"],
        help="add one of QEMU's test devices (repeatable; off by default, as in QEMU)",
    )
    p.add_argument("--load-addr", type=lambda s: int(s, 0), help="load address of a flat binary")
    p.set_defaults(func=run)


def _resolve_image(name: str) -> Path:
    path = Path(name)
    if path.exists() or "/" in name:
        return path
    from kvmkit import guests

    if name in guests.GUEST_NAMES:
        return guests.build_guest(name)
    return path  # the loader reports the missing file


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
        devices=args.device,
        echo=sys.stderr if args.json else sys.stdout,  # with --json, stdout is the JSON
    )
    try:
        result = run_guest(config)
    except KvmkitError:
        raise
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        sys.stdout.flush()
        if result.reason not in ("exit", "halt"):
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
    return result.process_status
