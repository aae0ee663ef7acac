"""``kvmkit restore DIR``: resume a guest from a snapshot directory (written by ``kvmkit
run IMAGE --snapshot DIR --snapshot-after S``) and run it to the end.

Guest memory is mapped copy-on-write from the snapshot (pages fault in as the guest
touches them; the snapshot is never changed), or read in first with --eager.  The same
snapshot may be restored any number of times.

Exit status: as ``kvmkit run`` (the guest's exit value, 0 for halt/reset/power-off, 124
on --timeout, 125 crash, 130 interrupted); 2 for a snapshot that cannot be restored
(missing, truncated, corrupted, another format version, a vCPU count other than
--vcpus, a KVM capability this host lacks).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from kvmkit.commands.run import _forwardable_stdin, _one_line_error, _seconds, _vcpu_count, report
from kvmkit.sizes import size_arg

DEFAULT_CONSOLE_LIMIT = 1 << 20


def register(sub: Any) -> None:
    p = sub.add_parser(
        "restore",
        help="resume a guest from a snapshot directory and run it to the end",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("snapshot", type=Path, metavar="DIR", help="the snapshot directory")
    p.add_argument(
        "--eager", action="store_true", help="read all guest memory in first (default: lazy)"
    )
    p.add_argument(
        "--vcpus", type=_vcpu_count, help="refuse a snapshot without exactly this many vCPUs"
    )
    p.add_argument("--timeout", type=_seconds, metavar="S", help="kick every vCPU after S seconds")
    p.add_argument("--stats", action="store_true", help="print exit statistics to stderr")
    p.add_argument(
        "--json", action="store_true", help="print the result and statistics as JSON on stdout"
    )
    p.add_argument(
        "--console-limit",
        type=size_arg("B"),
        default=DEFAULT_CONSOLE_LIMIT,
        metavar="SIZE",
        help="console bytes kept for --json (the last ones; default 1M)",
    )
    p.set_defaults(func=restore)
    p.error = _one_line_error(p.prog)


def _finish(args: argparse.Namespace, machine: Any) -> int:
    """Run a restored/incoming machine to the end and report as ``kvmkit run`` does."""
    machine.config.stdin_fd = _forwardable_stdin()
    timeout = getattr(args, "timeout", None)
    deadline = None if timeout is None else time.monotonic() + timeout
    with machine:
        result = machine.run(deadline)
    result.console_dropped = machine.console.dropped
    try:
        report(args, result, None)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return int(result.process_status)


def restore(args: argparse.Namespace) -> int:
    from kvmkit.kvm import Kvm
    from kvmkit.runner.machine import Machine

    with Kvm() as kvm:
        machine = Machine.restore(
            args.snapshot,
            eager=args.eager,
            kvm=kvm,
            echo=sys.stderr if args.json else sys.stdout,
            console_limit=args.console_limit,
            expect_vcpus=args.vcpus,
        )
        return _finish(args, machine)


def run_incoming(args: argparse.Namespace) -> int:
    """``kvmkit run --incoming ADDR``: receive a migrating guest, then run it."""
    from kvmkit.kvm import Kvm
    from kvmkit.runner.machine import Machine
    from kvmkit.runner.migration.destination import READY_LINE

    with Kvm() as kvm:
        machine, _stats = Machine.incoming(
            args.incoming,
            kvm=kvm,
            echo=sys.stderr if args.json else sys.stdout,
            console_limit=args.console_limit,
            timeout=args.incoming_timeout,
            ready=lambda: print(
                f"{READY_LINE} {args.incoming}",
                file=sys.stderr,
                flush=True,
            ),
        )
        return _finish(args, machine)
