"""The ``kvmkit`` command.

Each sub-command lives in its own module under :mod:`kvmkit.commands` and exposes
``register(subparsers) -> None``, which adds its parser and sets ``func`` (a callable
taking the parsed ``argparse.Namespace`` and returning an exit status).  Modules are
discovered, so adding a command never touches this file.

Start-up stays cheap: when the command line names a sub-command, only that module is
imported and registered (the others get name-only placeholders, so argparse still knows
every name); ``kvmkit --help`` or an unknown name imports them all.  Command modules
import their heavy dependencies (trio, the QEMU layer, pyelftools, matplotlib) inside the
functions that run the command, never at module level.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence

from kvmkit import commands
from kvmkit.errors import KvmkitError


def command_names() -> list[str]:
    """Every sub-command module's name, without importing any of them."""
    return sorted(
        info.name
        for info in pkgutil.iter_modules(commands.__path__)
        if not info.name.startswith("_")
    )


def _chosen(argv: Sequence[str], names: list[str]) -> str | None:
    """The sub-command the command line names (the first word that is not an option)."""
    for word in argv:
        if word == "--":
            return None
        if not word.startswith("-"):
            return word if word in names else None
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``argv``, only the sub-command it names is imported."""
    parser = argparse.ArgumentParser(
        prog="kvmkit",
        description="KVM hands on, QEMU by protocol: run minimal VMs on /dev/kvm, "
        "drive QEMU over QMP, measure and compare.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    names = command_names()
    chosen = _chosen(argv, names) if argv is not None else None
    for name in names:
        if chosen is not None and name != chosen:
            sub.add_parser(name, add_help=False)  # a placeholder: never the one parsed
            continue
        importlib.import_module(f"{commands.__name__}.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except KvmkitError as exc:
        print(f"kvmkit {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print(f"kvmkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `kvmkit info --json | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
