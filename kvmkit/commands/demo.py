"""``kvmkit demo``: full emulation vs hardware-assisted virtualization, seen, not told."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="the teaching demo: KVM backend, four engines, exit anatomy, a live Linux guest",
    )
    p.add_argument(
        "--quick", action="store_true", help="smaller workloads (for tests and slow hosts)"
    )
    p.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="also write a Markdown report with PNG plots and JSON",
    )
    p.add_argument("--no-linux", action="store_true", help="skip the QEMU Linux guest step")
    p.add_argument(
        "--steps",
        metavar="NAMES",
        help="run only these steps, comma-separated: host, engines, exits, linux, "
        "containers, io (default: all)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvmkit.demos.main import DemoOptions, parse_steps, run_demo

    text = getattr(args, "steps", None)
    steps = None if text is None else parse_steps(text)
    figures = run_demo(
        DemoOptions(quick=args.quick, report=args.report, linux=not args.no_linux, steps=steps)
    )
    return 1 if figures["failed"] else 0
