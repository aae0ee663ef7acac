"""``kvmkit vm``: virsh's verbs as a thin command line over :mod:`kvmkit.domains`.

Each verb parses its options, calls one :class:`kvmkit.domains.Domain` method and prints
the result (a rich table, or JSON with ``--json``).  Sizes take ``512M``, ``1G``,
``1.5G`` or a bare number of MiB, as virsh reads them.  Without ``--kernel``, ``start``
boots the guest kit (built on first use), so ``kvmkit vm start demo`` works on a fresh
machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

from kvmkit.sizes import MiB, size_arg

if TYPE_CHECKING:  # at run time a verb imports trio, rich and the QEMU layer when it runs
    import trio

    from kvmkit.domains import Domain

T = TypeVar("T")

MIN_MEMORY = 16 * MiB


def _domain(name: str) -> Domain:
    from kvmkit.domains import Domain

    return Domain(name)


def _run(fn: Callable[[], Awaitable[T]]) -> T:
    import trio

    return trio.run(fn)


def _ui() -> ModuleType:
    import kvmkit.ui

    return kvmkit.ui


def _say(text: str) -> None:
    print(text, flush=True)


# -- numbers ------------------------------------------------------------------------------


def _number(kind: type, low: float, high: float) -> Callable[[str], Any]:
    """An argparse ``type=`` for a finite ``kind`` (int or float) in ``[low, high]``."""

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is out of range [{low:g}, {high:g}]")
        return value

    convert.__name__ = kind.__name__
    return convert


SECONDS = _number(float, 0.0, 3600.0)
COUNT = _number(int, 1, 255)


# -- define / start -----------------------------------------------------------------------

_DEFINE_OPTIONS: tuple[str, ...] = ("kernel", "initrd", "append", "memory", "maxmem", "cpus")
_DEFINE_OPTIONS += ("maxcpus", "disk", "machine", "accel", "network", "boot")


def _definition_from_args(args: argparse.Namespace) -> Any:
    from kvmkit.domains import Boot, Definition, Nic, disks, guest_kit_boot
    from kvmkit.domains.definition import new_mac

    if args.boot == "disk":
        boot = Boot("disk")
    elif args.kernel:
        kernel = os.path.abspath(args.kernel)
        initrd = os.path.abspath(args.initrd) if args.initrd else None
        boot = Boot("kernel", kernel, initrd, args.append)
    else:
        boot = guest_kit_boot(None if args.quiet else _kit_progress)
    definition = Definition(
        args.name,
        memory_mib=(args.memory or 256 * MiB) // MiB,
        hotplug_memory_mib=args.maxmem // MiB if args.maxmem else None,
        memory_slots=4 if args.maxmem else 0,
        vcpus=args.cpus or 1,
        max_vcpus=args.maxcpus,
        machine=args.machine or "pc",
        accel=args.accel or "auto",
        boot=boot,
        nics=[Nic(mac=new_mac(set()))] if args.network == "user" else [],
        display=args.display or "none",
    )
    for path in args.disk or []:
        definition.disks.append(disks.new_disk(definition, path, None, None, False, set()))
    return definition.validate()


def _kit_progress(step: str, done: int, total: int) -> None:
    _ui().err_console.print(f"guest kit: [{done}/{total}] {step}")


def _define(args: argparse.Namespace) -> Domain:
    from kvmkit.domains import DomainStore, define

    if DomainStore().exists(args.name):
        given = [o for o in _DEFINE_OPTIONS if getattr(args, o, None)]
        if given:
            raise _error(
                f"domain {args.name} is defined already; --{given[0]} would be ignored",
                "change it with setmem/setmaxmem/attach-disk --config, or undefine it",
            )
        return _domain(args.name)
    return define(_definition_from_args(args))


def _error(message: str, hint: str) -> Exception:
    from kvmkit.domains import DomainError

    return DomainError(message, hint=hint)


def cmd_define(args: argparse.Namespace) -> int:
    from kvmkit.domains import define

    define(_definition_from_args(args))
    _say(f"Domain {args.name} defined")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    from kvmkit.domains import DomainStore

    new = not DomainStore().exists(args.name)
    dom = _define(args)

    async def main() -> int:
        try:
            report = await dom.start(wait_ready=args.wait, display=args.display)
        except BaseException:
            if new:  # a domain that never ran is not kept defined
                dom.store.remove(dom.name)
            raise
        _say(f"Domain {dom.name} started: pid {report.pid}, accelerator {report.accel}")
        if args.display == "vnc" or (args.display is None and dom.definition.display == "vnc"):
            _say(f"Domain {dom.name}: display {await dom.display_uri()}")
        if report.ready:
            _say(f"Domain {dom.name}: guest ready")
        elif report.ready is False:
            _ui().err_console.print(f"Domain {dom.name}: no ready marker within {args.wait:g} s")
        return 0

    return _run(main)


def cmd_create(args: argparse.Namespace) -> int:
    """virt-install --cdrom: define, create the disk, run the installer to power-off."""
    from kvmkit.domains import Boot, Definition, Nic, install
    from kvmkit.domains.definition import new_mac

    spec = install.parse_disk_spec(args.disk)
    definition = Definition(
        args.name,
        boot=Boot("disk"),
        memory_mib=(args.memory or 1024 * MiB) // MiB,
        vcpus=args.cpus or 1,
        machine=args.machine or "pc",
        accel=args.accel or "auto",
        nics=[Nic(mac=new_mac(set()))] if args.network == "user" else [],
        display=args.display or "none",
    ).validate()
    ui = _ui()
    with ui.progress(f"installing {args.name} from {args.cdrom}", total=None) as advance:
        seen: list[str] = []

        def show(what: str, step: int, total: int) -> None:
            label = f"[{step}/{total}] {what}" if total else what
            if what.startswith("display "):
                ui.err_console.print(f"install: {what}")  # where to watch a graphical one
            elif not ui.err_console.is_terminal and total and label not in seen:
                ui.err_console.print(f"install: {label}")  # one line per step elsewhere
            seen.append(label)
            advance(0, description=f"installing {args.name}: {label}")

        report = _run(
            lambda: install.create(
                definition, args.cdrom, spec, progress=show, timeout=args.timeout
            )
        )
    if args.json:
        ui.print_json(report.to_json())
        return 0
    _say(
        f"Domain {args.name} installed in {report.seconds:.0f} s on {report.disk} "
        f"({spec.size // MiB} MiB {spec.format}); `kvmkit vm start {args.name}` boots it"
    )
    return 0


# -- list / dominfo / dumpconfig / domblklist -----------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    from kvmkit.domains import list_domains

    async def main() -> int:
        rows = [await dom.summary() for dom in list_domains()]
        if args.json:
            _ui().print_json(rows)
            return 0
        _ui().print_table(
            ["Name", "State", "PID", "Max memory", "CPUs", "Autostart"],
            [
                [
                    r["name"],
                    r["state"],
                    str(r["pid"] or "-"),
                    f"{r['memory_mib']} MiB" if "memory_mib" in r else None,
                    r.get("cpus"),
                    _yes_no(r.get("autostart")),
                ]  # fmt: skip
                for r in rows
            ],
            numeric=("PID", "Max memory", "CPUs"),
        )
        dead = [str(r["name"]) for r in rows if r["state"] == "dead"]
        if dead:
            _ui().err_console.print(
                f"dead (QEMU exited): {', '.join(dead)}; `kvmkit vm cleanup` clears"
            )
        return 0

    return _run(main)


def _yes_no(value: bool | None) -> str | None:
    return None if value is None else "yes" if value else "no"


def cmd_dominfo(args: argparse.Namespace) -> int:
    dom = _domain(args.name)

    async def main() -> int:
        info = await dom.info()
        if args.json:
            _ui().print_json(info)
            return 0
        labels = {
            "name": "Name", "state": "State", "cpus": "CPU(s)", "max_memory_mib": "Max memory",
            "used_memory_mib": "Used memory", "persistent": "Persistent",
            "autostart": "Autostart", "pid": "PID", "accel": "Accelerator",
        }  # fmt: skip
        rows = []
        for key, label in labels.items():
            value = info[key]
            if isinstance(value, bool):
                value = _yes_no(value)
            elif key.endswith("_mib"):
                value = f"{value} MiB"
            elif key == "pid":
                value = str(value or "-")
            rows.append([label, value])
        _ui().print_table(["Field", "Value"], rows)
        return 0

    return _run(main)


def cmd_dumpconfig(args: argparse.Namespace) -> int:
    _ui().print_json(_domain(args.name).dumpconfig())
    return 0


def cmd_domblklist(args: argparse.Namespace) -> int:
    dom = _domain(args.name)

    async def main() -> int:
        rows = await dom.block_list(inactive=args.inactive)
        if args.json:
            _ui().print_json(rows)
        else:
            _ui().print_table(["Target", "Source"], [[r["target"], r["source"]] for r in rows])
        return 0

    return _run(main)


def cmd_domdisplay(args: argparse.Namespace) -> int:
    _say(_run(_domain(args.name).display_uri))
    return 0


def cmd_screenshot(args: argparse.Namespace) -> int:
    dom = _domain(args.name)
    path = _run(lambda: dom.screenshot(args.out))
    _say(f"Domain {args.name}: screen saved to {path}")
    return 0


# -- console / qmp ----------------------------------------------------------------------------


def cmd_console(args: argparse.Namespace) -> int:
    dom = _domain(args.name)

    async def run_command() -> int:
        sys.stdout.write(await dom.console_run(args.shell, timeout=args.timeout))
        return 0

    async def interactive() -> int:
        stream = await dom.open_console()
        _ui().err_console.print(f"connected to {dom.name}'s serial console; Ctrl-] to leave")
        await _pump_terminal(stream)
        _ui().err_console.print("\ndisconnected")
        return 0

    return _run(run_command if args.shell else interactive)


async def _pump_terminal(stream: trio.SocketStream) -> None:
    """Copy the terminal to ``stream`` and back in raw mode until Ctrl-] or EOF."""
    import termios
    import tty

    import trio

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    if saved is not None:
        tty.setraw(fd)
    try:
        async with trio.open_nursery() as nursery:

            async def pump_out() -> None:
                while data := await stream.receive_some(4096):
                    os.write(sys.stdout.fileno(), data)
                nursery.cancel_scope.cancel()

            async def pump_in() -> None:
                while True:
                    data = await trio.to_thread.run_sync(os.read, fd, 1024, abandon_on_cancel=True)
                    if not data or b"\x1d" in data:
                        nursery.cancel_scope.cancel()
                        return
                    await stream.send_all(data)

            nursery.start_soon(pump_out)
            nursery.start_soon(pump_in)
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        await stream.aclose()


def cmd_qmp(args: argparse.Namespace) -> int:
    from kvmkit.qmp import ExecuteError

    try:
        arguments = json.loads(args.arguments) if args.arguments else None
    except ValueError as exc:
        raise _error(f"arguments are not valid JSON: {exc}", "pass one JSON object") from None
    if arguments is not None and not isinstance(arguments, dict):
        raise _error("arguments must be a JSON object", "e.g. '{\"value\": 1}'")
    dom = _domain(args.name)

    async def main() -> int:
        try:
            reply = await dom.qmp_command(args.qmp_command, arguments)
        except ExecuteError as exc:
            _ui().err_console.print(f"kvmkit vm qmp: {args.qmp_command} failed: {exc}")
            return 1
        _ui().print_json(reply)
        return 0

    return _run(main)


# -- lifecycle -------------------------------------------------------------------------------


def cmd_suspend(args: argparse.Namespace) -> int:
    _run(_domain(args.name).suspend)
    _say(f"Domain {args.name} suspended")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    _run(_domain(args.name).resume)
    _say(f"Domain {args.name} resumed")
    return 0


def cmd_shutdown(args: argparse.Namespace) -> int:
    dom = _domain(args.name)
    step = _run(lambda: dom.shutdown(timeout=args.timeout))
    _say(f"Domain {args.name} is being shut down: stopped ({step})")
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    dom = _domain(args.name)
    step = _run(dom.destroy)
    _say(f"Domain {args.name} destroyed ({step})")
    if args.undefine:
        dom.undefine()
        _say(f"Domain {args.name} has been undefined")
    return 0


def cmd_undefine(args: argparse.Namespace) -> int:
    _domain(args.name).undefine()
    _say(f"Domain {args.name} has been undefined")
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from kvmkit.domains import list_domains

    cleaned = [dom.name for dom in list_domains() if dom.cleanup()]
    _say(f"cleaned up: {', '.join(cleaned)}" if cleaned else "nothing to clean up")
    return 0


def cmd_autostart(args: argparse.Namespace) -> int:
    from kvmkit.domains import start_autostart

    if args.install_unit or args.uninstall_unit:
        from pathlib import Path

        from kvmkit.domains import autostart

        unit_dir = Path(args.unit_dir) if args.unit_dir else None
        if args.install_unit:
            path = autostart.install_unit(unit_dir)
            _say(f"installed and enabled {path}: `kvmkit vm autostart --run` at boot")
        elif autostart.uninstall_unit(unit_dir):
            _say(f"removed {autostart.UNIT_NAME}")
        else:
            _say(f"{autostart.UNIT_NAME} was not installed")
        return 0
    if args.run:
        started = _run(lambda: start_autostart(wait_ready=args.wait))
        _say(f"autostart: started {len(started)} domain(s) {' '.join(started)}".rstrip())
        return 0
    if not args.name:
        raise _error("name a domain", "or use --run to start every autostart domain")
    _domain(args.name).set_autostart(not args.disable)
    _say(f"Domain {args.name} {'unmarked as' if args.disable else 'marked as'} autostarted")
    return 0


# -- memory and disks ---------------------------------------------------------------------------


def cmd_setmem(args: argparse.Namespace) -> int:
    dom = _domain(args.name)
    actual = _run(lambda: dom.set_memory(args.size, live=args.live, config=args.config))
    if actual is not None:
        _say(f"Domain {args.name}: balloon at {actual:.0f} MiB")
    if args.config or actual is None:
        _say(f"Domain {args.name}: memory {args.size // MiB} MiB from the next start")
    return 0


def cmd_setmaxmem(args: argparse.Namespace) -> int:
    definition = _domain(args.name).set_max_memory(args.size)
    _say(
        f"Domain {args.name}: max memory {definition.memory_mib} MiB, current "
        f"{definition.current_mib} MiB from the next start"
    )
    return 0


def _affect_args(dom: Domain, args: argparse.Namespace) -> tuple[bool | None, bool | None]:
    """Virsh's --persistent: the definition, and the running guest when there is one."""
    if args.persistent:
        return dom.is_active(), True
    return args.live, args.config


def cmd_attach_disk(args: argparse.Namespace) -> int:
    dom = _domain(args.name)
    live, config = _affect_args(dom, args)
    disk = _run(
        lambda: dom.attach_disk(
            args.source,
            target=args.target,
            fmt=args.subdriver,
            readonly=args.mode == "readonly",
            live=live,
            config=config,
        )
    )
    _say(f"Domain {args.name}: attached {disk.source} as {disk.target}")
    return 0


def cmd_detach_disk(args: argparse.Namespace) -> int:
    dom = _domain(args.name)
    live, config = _affect_args(dom, args)
    target = _run(
        lambda: dom.detach_disk(
            args.target, source=args.source, live=live, config=config, timeout=args.timeout
        )
    )
    _say(f"Domain {args.name}: disk {target} detached")
    return 0


# -- vCPUs and NICs ------------------------------------------------------------------------------


def cmd_setvcpus(args: argparse.Namespace) -> int:
    dom = _domain(args.name)
    count = _run(
        lambda: dom.set_vcpus(args.count, live=args.live, config=args.config, maximum=args.maximum)
    )
    if args.maximum:
        _say(f"Domain {args.name}: at most {args.count} vCPUs from the next start")
    elif args.config and not args.live:
        _say(f"Domain {args.name}: {count} vCPUs from the next start")
    else:
        _say(f"Domain {args.name}: {count} vCPUs online")
    return 0


def cmd_attach_interface(args: argparse.Namespace) -> int:
    dom = _domain(args.name)
    live, config = _affect_args(dom, args)
    nic = _run(
        lambda: dom.attach_interface(
            type=args.type, model=args.model, mac=args.mac, live=live, config=config
        )
    )
    _say(f"Domain {args.name}: interface {nic.mac} attached ({nic.model} on {nic.network})")
    return 0


def cmd_detach_interface(args: argparse.Namespace) -> int:
    dom = _domain(args.name)
    live, config = _affect_args(dom, args)
    mac = _run(
        lambda: dom.detach_interface(
            type=args.type, mac=args.mac, live=live, config=config, timeout=args.timeout
        )
    )
    _say(f"Domain {args.name}: interface {mac} detached")
    return 0


def cmd_domiflist(args: argparse.Namespace) -> int:
    dom = _domain(args.name)
    rows = _run(lambda: dom.interfaces(inactive=args.inactive))
    if args.json:
        _ui().print_json(rows)
    else:
        _ui().print_table(
            ["MAC", "Type", "Model"],
            [[r["mac"] or "(QEMU default)", r["type"], r["model"]] for r in rows],
        )
    return 0


# -- snapshots, clone, migrate -------------------------------------------------------------------


def cmd_snapshot(args: argparse.Namespace) -> int:
    dom = _domain(args.name)

    async def main() -> int:
        if args.list:
            snaps = await dom.snapshot_list()
            if args.json:
                _ui().print_json(snaps)
            else:
                rows = [[s["name"], s["vm-state-size"] / MiB] for s in snaps]
                _ui().print_table(["Name", "VM state (MiB)"], rows, numeric=("VM state (MiB)",))
            return 0
        if not args.tag:
            raise _error("name the snapshot", "kvmkit vm snapshot NAME TAG")
        if args.delete:
            await dom.snapshot_delete(args.tag)
            _say(f"Domain {args.name}: snapshot {args.tag} deleted")
        else:
            await dom.snapshot_create(args.tag)
            _say(f"Domain {args.name}: snapshot {args.tag} saved")
        return 0

    return _run(main)


def cmd_revert(args: argparse.Namespace) -> int:
    dom = _domain(args.name)
    _run(lambda: dom.snapshot_revert(args.tag))
    _say(f"Domain {args.name}: reverted to {args.tag}")
    return 0


def cmd_clone(args: argparse.Namespace) -> int:
    clone = _domain(args.name).clone(args.new, linked=args.linked)
    kind = "linked clone (qcow2 overlays)" if args.linked else "full copy"
    disks = len(clone.definition.disks)
    _say(f"Domain {args.new} created from {args.name}: {kind}, {disks} disk(s)")
    return 0


def _migration_progress(json_mode: bool) -> Callable[[dict[str, Any]], None]:
    tty = sys.stderr.isatty()

    def show(info: dict[str, Any]) -> None:
        ram = info.get("ram", {})
        total = ram.get("total") or 1
        done = total - ram.get("remaining", total)
        line = (
            f"migrate: {info.get('status')} {100 * done / total:5.1f}% "
            f"{ram.get('transferred', 0) / MiB:7.1f} MiB sent, "
            f"{ram.get('mbps', 0):7.0f} Mbit/s, dirty sync {ram.get('dirty-sync-count', 0)}"
        )
        if tty:
            print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)
        elif not json_mode:
            print(line, file=sys.stderr, flush=True)

    return show


def cmd_migrate(args: argparse.Namespace) -> int:
    from kvmkit.qemu import migration

    dom = _domain(args.name)
    options = migration.MigrationOptions(
        downtime_limit_ms=args.downtime_limit,
        max_bandwidth=args.bandwidth,
        postcopy=args.postcopy,
        auto_converge=args.auto_converge,
    )
    # The statistics carry the warnings; print them once, below, not as Python warnings.
    warnings.simplefilter("ignore", migration.MigrationWarning)
    progress = _migration_progress(args.json)
    stats = _run(lambda: dom.migrate(args.uri, options=options, progress=progress))
    if sys.stderr.isatty():
        print(file=sys.stderr)
    if args.json:
        _ui().print_json(stats.to_json())
        return 0
    _say(f"Domain {args.name}: {stats.summary()}")
    for warning in stats.warnings:
        _ui().err_console.print(f"warning: {warning}")
    return 0


# -- parser ----------------------------------------------------------------------------------


def _add_define_options(p: argparse.ArgumentParser) -> None:
    memory = size_arg("M", minimum=MIN_MEMORY)
    p.add_argument("name")
    p.add_argument("--kernel", help="kernel image (default: the guest kit)")
    p.add_argument("--initrd")
    p.add_argument("--append")
    p.add_argument("--boot", choices=("kernel", "disk"), help="disk: the firmware boots disk 1")
    p.add_argument("--memory", type=memory, help="RAM: 512M, 1G, 1.5G or MiB (default 256)")
    p.add_argument("--maxmem", type=memory, help="memory hotplug ceiling (pc-dimm), as --memory")
    p.add_argument("--cpus", type=COUNT)
    p.add_argument("--maxcpus", type=COUNT)
    p.add_argument("--disk", action="append", help="disk image (repeatable): vda, vdb, ...")
    p.add_argument("--machine", choices=("pc", "q35", "microvm"))
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"))
    p.add_argument("--network", choices=("none", "user"))
    p.add_argument(
        "--display", choices=("none", "vnc"), help="vnc: a VNC screen on 127.0.0.1 (domdisplay)"
    )
    p.add_argument("--quiet", action="store_true")


def _add_affect_options(p: argparse.ArgumentParser, persistent: bool) -> None:
    group = p.add_mutually_exclusive_group()
    if persistent:
        group.add_argument("--persistent", action="store_true", help="running guest + definition")
    group.add_argument("--config", action="store_true", help="the definition (next start)")
    p.add_argument("--live", action="store_true", help="the running guest")
    p.add_argument("--current", action="store_true", help="live if running, else config")


Handler = Callable[[argparse.Namespace], int]


class _Verbs:
    """Adds ``kvmkit vm`` verbs: ``verb`` for any, ``named`` for those on one domain."""

    def __init__(self, sub: Any) -> None:
        self.sub = sub

    def verb(self, name: str, func: Handler, text: str, **kw: Any) -> Any:
        p = self.sub.add_parser(name, help=text, **kw)
        p.set_defaults(func=func)
        return p

    def named(self, name: str, func: Handler, text: str, **kw: Any) -> Any:
        p = self.verb(name, func, text, **kw)
        p.add_argument("name")
        return p


def _register_lifecycle(v: _Verbs) -> None:
    _add_define_options(v.verb("define", cmd_define, "define a domain (does not start it)"))
    p = v.verb("start", cmd_start, "start a domain (defining it first if new)")
    _add_define_options(p)
    p.add_argument("--wait", type=SECONDS, default=60.0, help="seconds to wait for the guest kit")
    v.named("suspend", cmd_suspend, "pause the domain")
    v.named("resume", cmd_resume, "resume the domain")
    p = v.named("shutdown", cmd_shutdown, "ACPI power-off, then quit/SIGTERM/SIGKILL")
    p.add_argument("--timeout", type=SECONDS, default=30.0)
    p = v.named("destroy", cmd_destroy, "stop at once (no power-off)")
    p.add_argument("--undefine", action="store_true", help="also delete the definition")
    v.named("undefine", cmd_undefine, "delete a shut-off domain's definition and folder")
    v.verb("cleanup", cmd_cleanup, "forget recorded QEMUs that are gone")
    p = v.verb("autostart", cmd_autostart, "mark a domain for autostart; --run starts all marked")
    p.add_argument("name", nargs="?")
    p.add_argument("--disable", action="store_true")
    p.add_argument("--run", action="store_true")
    p.add_argument("--wait", type=SECONDS, default=0.0, help="with --run: seconds per guest kit")
    unit = p.add_mutually_exclusive_group()
    unit.add_argument(
        "--install-unit", action="store_true", help="systemd unit running --run at boot"
    )
    unit.add_argument("--uninstall-unit", action="store_true", help="remove that unit")
    p.add_argument("--unit-dir", help="unit folder (default /etc/systemd/system)")


def _register_create(v: _Verbs) -> None:
    p = v.named("create", cmd_create, "install from an ISO onto a new disk (virt-install)")
    p.add_argument("--cdrom", required=True, help="installer ISO (kvmkit guest iso makes one)")
    p.add_argument("--disk", required=True, help="size=2G,format=qcow2[,path=/abs/disk.qcow2]")
    p.add_argument("--memory", type=size_arg("M", minimum=MIN_MEMORY), help="default 1G")
    p.add_argument("--cpus", type=COUNT)
    p.add_argument("--machine", choices=("pc", "q35"))
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"))
    p.add_argument("--network", choices=("none", "user"))
    p.add_argument("--display", choices=("none", "vnc"), help="vnc: see a graphical installer")
    p.add_argument("--timeout", type=_number(float, 1, 86400), default=1800.0, help="seconds")
    p.add_argument("--json", action="store_true", help="print the install report as JSON")


def _register_information(v: _Verbs) -> None:
    v.verb("list", cmd_list, "list domains").add_argument("--json", action="store_true")
    p = v.named("dominfo", cmd_dominfo, "state, CPUs, memory, autostart", aliases=["info"])
    p.add_argument("--json", action="store_true")
    v.named("dumpconfig", cmd_dumpconfig, "print the definition (JSON)")
    p = v.named("domblklist", cmd_domblklist, "list disks: target and source")
    p.add_argument("--inactive", action="store_true", help="the definition's disks")
    p.add_argument("--json", action="store_true")
    v.named("domdisplay", cmd_domdisplay, "print the VNC display's URI (vnc://127.0.0.1:PORT)")
    p = v.named("screenshot", cmd_screenshot, "save the guest's screen as PNG (QMP screendump)")
    p.add_argument("out", help="the PNG file to write")
    p = v.named("console", cmd_console, "attach to the serial console (Ctrl-] leaves)")
    p.add_argument(
        "--command", "-c", dest="shell", help="run one shell command in the guest, print its output"
    )
    p.add_argument("--timeout", type=SECONDS, default=30.0)
    p = v.named("qmp", cmd_qmp, "send one QMP command and print the reply")
    p.add_argument("qmp_command", metavar="command")
    p.add_argument("arguments", nargs="?", help="JSON object")


def _register_devices(v: _Verbs) -> None:
    size = size_arg("M", minimum=MIN_MEMORY)
    p = v.named("setmem", cmd_setmem, "balloon target (--live) and/or next-start memory (--config)")
    p.add_argument("size", type=size, help="512M, 1G, 1.5G or MiB")
    _add_affect_options(p, persistent=False)
    p = v.named("setmaxmem", cmd_setmaxmem, "max memory from the next start (the definition)")
    p.add_argument("size", type=size, help="512M, 1G, 1.5G or MiB")
    p.add_argument("--config", action="store_true", help="(the default: the definition)")
    p = v.named("attach-disk", cmd_attach_disk, "add a disk (hot, and/or to the definition)")
    p.add_argument("source")
    p.add_argument("--target", help="vdb, vdc, ... (default: the first free)")
    p.add_argument("--subdriver", "--format", choices=("qcow2", "raw"), dest="subdriver")
    p.add_argument("--mode", choices=("readonly",))
    _add_affect_options(p, persistent=True)
    p = v.named("detach-disk", cmd_detach_disk, "remove a disk by target or --source PATH")
    p.add_argument("target", nargs="?")
    p.add_argument("--source", help="the disk's image path")
    p.add_argument("--timeout", type=SECONDS, default=15.0)
    _add_affect_options(p, persistent=True)


def _register_cpus_and_nics(v: _Verbs) -> None:
    p = v.named("setvcpus", cmd_setvcpus, "vCPUs: hotplug (--live) and/or next start (--config)")
    p.add_argument("count", type=COUNT)
    p.add_argument("--maximum", action="store_true", help="the hotplug ceiling (with --config)")
    _add_affect_options(p, persistent=False)
    p = v.named("attach-interface", cmd_attach_interface, "add a virtio NIC on a user network")
    p.add_argument("--type", choices=("user",), default="user")
    p.add_argument("--model", choices=("virtio",), default="virtio")
    p.add_argument("--mac", help="52:54:00:xx:xx:xx (default: a new random one)")
    _add_affect_options(p, persistent=True)
    p = v.named("detach-interface", cmd_detach_interface, "remove a NIC (by --mac)")
    p.add_argument("--type", choices=("user",), default="user")
    p.add_argument("--mac", help="which NIC (needed when there are several)")
    p.add_argument("--timeout", type=SECONDS, default=15.0)
    _add_affect_options(p, persistent=True)
    p = v.named("domiflist", cmd_domiflist, "list NICs: MAC, type, model")
    p.add_argument("--inactive", action="store_true", help="the definition's NICs")
    p.add_argument("--json", action="store_true")


def _register_images(v: _Verbs) -> None:
    p = v.named("snapshot", cmd_snapshot, "save an internal snapshot (or --list / --delete)")
    p.add_argument("tag", nargs="?")
    p.add_argument("--list", action="store_true")
    p.add_argument("--delete", action="store_true")
    p.add_argument("--json", action="store_true")
    v.named("revert", cmd_revert, "revert to a snapshot").add_argument("tag")
    p = v.named("clone", cmd_clone, "copy a shut-off domain (full, or --linked qcow2 overlays)")
    p.add_argument("new")
    p.add_argument("--linked", action="store_true")
    p = v.named("migrate", cmd_migrate, "live-migrate (default: to a new local QEMU)")
    p.add_argument("--uri", help="tcp:HOST:PORT, unix:PATH or exec:CMD")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("--downtime-limit", type=_number(int, 1, 600_000), help="ms")
    p.add_argument("--bandwidth", type=size_arg("M", minimum=MiB), help="per second: 64M, 1G, MiB")
    p.add_argument("--postcopy", action="store_true")
    p.add_argument("--auto-converge", action="store_true")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "vm", help="define, start, drive and migrate QEMU guests (virsh)"
    )
    verbs = _Verbs(parser.add_subparsers(dest="vm_command", metavar="ACTION", required=True))
    _register_lifecycle(verbs)
    _register_create(verbs)
    _register_information(verbs)
    _register_devices(verbs)
    _register_cpus_and_nics(verbs)
    _register_images(verbs)


__all__ = ["register"]
