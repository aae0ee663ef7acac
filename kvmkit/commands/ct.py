"""``kvmkit ct``: LXC containers with the course's verbs (lxc-create, lxc-start, lxc-attach,
lxc-console, lxc-info, lxc-ls, lxc-stop, lxc-destroy), each a call to one method of
:class:`kvmkit.containers.Container`.  Every verb takes ``--json`` and ``--lxcpath``
(default: kvmkit's own, never the host's /var/lib/lxc)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _container(args: argparse.Namespace) -> Any:
    from kvmkit.containers import Container

    return Container(args.name, args.lxcpath)


def _emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    from kvmkit.ui import print_json

    if args.json:
        print_json(data)
    else:
        print(text)


def _mib(value: int | None) -> str | None:
    return None if value is None else f"{value / 2**20:.2f} MiB"


def cmd_create(args: argparse.Namespace) -> int:
    ct = _container(args)
    ct.create(args.template, network=args.network)
    info = ct.info()
    _emit(args, info.to_json(), f"container {ct.name} created ({args.template}, {args.network})")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    ct = _container(args)
    ct.start(timeout=args.timeout)
    info = ct.info()
    _emit(args, info.to_json(), f"container {ct.name} started: init pid {info.pid}")
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    from kvmkit.containers import ContainerStateError

    # argparse.REMAINDER takes everything after NAME; options written between NAME and
    # "--" (kvmkit ct attach t1 --json -- ls) are this verb's own.
    cmd = list(args.cmd)
    if "--" in cmd:
        cut = cmd.index("--")
        args.options_parser.parse_args(cmd[:cut], namespace=args)
        cmd = cmd[cut + 1 :]
    if not cmd:
        raise ContainerStateError(
            "no command given", hint=f"kvmkit ct attach {args.name} -- uname -r"
        )
    status, output = _container(args).attach(cmd, timeout=args.timeout)
    if args.json:
        from kvmkit.ui import print_json

        print_json({"name": args.name, "command": cmd, "status": status, "output": output})
    else:
        sys.stdout.write(output)
        sys.stdout.flush()
    return int(status)


def cmd_console(args: argparse.Namespace) -> int:
    ct = _container(args)
    if args.log:
        log = ct.console_log()
        _emit(args, {"name": ct.name, "console_log": log}, log.rstrip("\n"))
        return 0
    status = int(ct.console(tty=args.tty))
    if args.json:
        from kvmkit.ui import print_json

        print_json({"name": ct.name, "tty": args.tty, "status": status})
    return status


def _info_rows(info: Any) -> list[tuple[str, Any]]:
    return [
        ("name", info.name),
        ("state", info.state),
        ("pid", None if info.pid is None else str(info.pid)),
        ("memory", _mib(info.memory_bytes)),
        ("cpu", None if info.cpu_ns is None else f"{info.cpu_ns / 1e9:.3f} s"),
        ("ips", ", ".join(info.ips) or None),
        ("network", info.network + (f" (host end {info.veth})" if info.veth else "")),
        ("lxcpath", info.lxcpath),
    ]


def cmd_info(args: argparse.Namespace) -> int:
    from kvmkit.ui import print_json, print_table

    info = _container(args).info()
    if args.json:
        print_json(info.to_json())
    else:
        print_table(["", ""], _info_rows(info))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from kvmkit.containers import list_containers
    from kvmkit.ui import print_json, print_table

    infos = list_containers(args.lxcpath)
    if args.json:
        print_json([i.to_json() for i in infos])
    else:
        rows = [
            (
                i.name,
                i.state,
                None if i.pid is None else str(i.pid),
                _mib(i.memory_bytes),
                ", ".join(i.ips) or None,
                i.network,
            )
            for i in infos
        ]
        print_table(["name", "state", "pid", "memory", "ips", "network"], rows, numeric=["pid"])
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    ct = _container(args)
    ct.stop(timeout=args.timeout, kill=args.kill)
    _emit(args, ct.info().to_json(), f"container {ct.name} stopped")
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    ct = _container(args)
    ct.destroy(force=args.force)
    _emit(args, {"name": ct.name, "destroyed": True}, f"container {ct.name} destroyed")
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("ct", help="LXC containers beside the VMs (lxc-* verbs)")
    sub = parser.add_subparsers(dest="ct_command", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    common.add_argument(
        "--lxcpath",
        metavar="DIR",
        help="where the containers live (default: <kvmkit state dir>/containers)",
    )

    def verb(name: str, func: Any, help: str, *, named: bool = True) -> Any:
        p = sub.add_parser(name, help=help, parents=[common])
        if named:
            p.add_argument("name")
        p.set_defaults(func=func)
        return p

    p = verb("create", cmd_create, "create a container from an LXC template (lxc-create)")
    p.add_argument("--template", "-t", default="busybox", help="LXC template (default busybox)")
    p.add_argument(
        "--network",
        choices=("none", "veth"),
        default="none",
        help="none (only lo; default) or a veth pair routed from the host",
    )
    p = verb("start", cmd_start, "start a container (lxc-start)")
    p.add_argument("--timeout", type=float, default=30.0)
    attach_opts = argparse.ArgumentParser(add_help=False, parents=[common])
    attach_opts.add_argument("--timeout", type=float, default=None, help="seconds (no limit)")
    p = sub.add_parser(
        "attach", help="run a command inside (lxc-attach NAME -- CMD)", parents=[attach_opts]
    )
    p.add_argument("name")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD")
    p.set_defaults(func=cmd_attach, options_parser=attach_opts)
    p = verb("console", cmd_console, "the container's console (lxc-console; Ctrl-a q leaves)")
    p.add_argument("--tty", type=int, default=1)
    p.add_argument("--log", action="store_true", help="print what the console showed and exit")
    verb("info", cmd_info, "state, init PID, memory, IPs (lxc-info)")
    verb("list", cmd_list, "list the containers (lxc-ls)", named=False)
    p = verb("stop", cmd_stop, "stop a container (lxc-stop)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds before SIGKILL")
    p.add_argument("--kill", action="store_true", help="SIGKILL at once")
    p = verb("destroy", cmd_destroy, "delete a container (lxc-destroy)")
    p.add_argument("--force", action="store_true", help="kill it first if running")


__all__ = ["register"]
