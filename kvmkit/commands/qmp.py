"""``kvmkit qmp``: run one QMP command, or follow events, on a running QEMU.

::

    kvmkit qmp /run/vm/qmp.sock query-status
    kvmkit qmp localhost:4444 qom-get '{"path": "/machine", "property": "type"}'
    kvmkit qmp /run/vm/qmp.sock --events                 # every event, one JSON per line
    kvmkit qmp /run/vm/qmp.sock --events STOP RESUME     # only these
    kvmkit qmp /run/vm/qmp.sock --events SHUTDOWN --match '{"reason": "host-qmp-quit"}'

ADDRESS is a unix socket path (``unix:`` prefix optional) or ``HOST:PORT`` (``tcp:`` prefix
optional; ``[v6addr]:PORT`` for IPv6).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

_TCP = re.compile(r"(?:tcp:)?\[?(?P<host>[^\[\]]*?)\]?:(?P<port>\d+)")


def parse_address(text: str) -> str | tuple[str, int]:
    """A unix socket path or a (host, port) pair, from the command line's ADDRESS."""
    from kvmkit.qmp.errors import UsageError

    if text.startswith("unix:"):
        return text[len("unix:") :]
    if "/" not in text and not Path(text).exists():
        match = _TCP.fullmatch(text)
        if match and match["host"]:
            return match["host"], int(match["port"])
    if text.startswith("tcp:"):
        raise UsageError(f"cannot parse TCP address {text!r}", hint="use tcp:HOST:PORT")
    return text


def _json_object(text: str, what: str) -> dict[str, Any]:
    from kvmkit.qmp.errors import UsageError

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UsageError(
            f"{what} is not valid JSON: {exc}",
            hint='quote it for the shell, e.g. \'{"path": "/machine"}\'',
        ) from exc
    if not isinstance(value, dict):
        raise UsageError(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


async def _execute(args: argparse.Namespace, arguments: dict[str, Any] | None) -> int:
    from kvmkit.qmp import ExecuteError, QMPError, open_qmp

    async with open_qmp(
        parse_address(args.address),
        connect_timeout=args.connect_timeout,
        validate=args.validate,
    ) as qmp:
        try:
            result = await qmp.execute(args.command_name, arguments, timeout=args.timeout)
        except ExecuteError as exc:
            raise QMPError(f"{args.command_name} failed: {exc.error_class}: {exc}") from exc
    indent = None if args.compact else 2
    if isinstance(result, str) and args.raw:
        print(result, end="" if result.endswith("\n") else "\n")  # HMP output reads better raw
    else:
        print(json.dumps(result, indent=indent))
    return 0


async def _follow(args: argparse.Namespace, match: dict[str, Any] | None) -> int:
    from kvmkit.qmp import DisconnectedError, open_qmp

    address = parse_address(args.address)
    # Back-pressure, not loss: while this loop writes an event, QEMU's next ones wait
    # in the socket and the listener's buffer, however long the writing takes.
    async with (
        open_qmp(address, connect_timeout=args.connect_timeout) as qmp,
        qmp.listen(*args.events, match=match, overflow="block") as events,
    ):
        print(f"following events on {qmp.address} (Ctrl-C to stop)", file=sys.stderr)
        try:
            async for event in events:
                print(json.dumps(dict(event)), flush=True)
        except DisconnectedError:
            # QEMU quitting ends the stream; that is how following usually stops.
            print(f"{qmp.address} closed the connection", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    import trio

    from kvmkit.qmp.errors import UsageError, check_timeout

    check_timeout(args.timeout, "--timeout", allow_inf=False)
    check_timeout(args.connect_timeout, "--connect-timeout", allow_inf=False)
    if args.events is not None:
        if args.command_name is not None:
            raise UsageError("give either COMMAND or --events, not both")
        match = _json_object(args.match, "--match") if args.match else None
        try:
            return trio.run(_follow, args, match, restrict_keyboard_interrupt_to_checkpoints=True)
        except KeyboardInterrupt:
            return 0
    if args.command_name is None:
        raise UsageError("missing COMMAND", hint="e.g. kvmkit qmp ADDRESS query-status")
    arguments = _json_object(args.arguments, "JSON-ARGS") if args.arguments else None
    return trio.run(_execute, args, arguments, restrict_keyboard_interrupt_to_checkpoints=True)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "qmp",
        help="run a QMP command on a running QEMU, or follow its events",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("address", metavar="ADDRESS", help="unix socket path or HOST:PORT")
    parser.add_argument("command_name", metavar="COMMAND", nargs="?", help="QMP command")
    parser.add_argument(
        "arguments", metavar="JSON-ARGS", nargs="?", help="the command's arguments, a JSON object"
    )
    parser.add_argument(
        "--events",
        nargs="*",
        metavar="NAME",
        help="follow events (all, or only those named) until interrupted",
    )
    parser.add_argument("--match", metavar="JSON", help="with --events: only events whose "
                        "data contains this JSON object")  # fmt: skip
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the reply (60)"
    )
    parser.add_argument("--connect-timeout", type=float, default=5.0, help="seconds to connect (5)")
    parser.add_argument(
        "--validate", action="store_true", help="check the command against the live schema first"
    )
    parser.add_argument("--compact", action="store_true", help="print JSON on one line")
    parser.add_argument(
        "--raw", action="store_true", help="print a string reply (HMP output) as plain text"
    )
    parser.set_defaults(func=run)
