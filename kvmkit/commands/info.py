"""``kvmkit info [--json]``: what /dev/kvm on this host offers and what it means."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "info", help="show the host's KVM: API version, backend, limits, capabilities"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvmkit.kvm.info import format_info, host_info

    info = host_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0
