"""``kvmkit vm``: virsh's everyday verbs, on QMP.

State lives in a per-user folder (see :mod:`kvmkit.qemu.vmstore`); QEMU runs detached and
outlives the command.  Without ``--kernel``, ``start`` boots the guest kit (built on first
use), so ``kvmkit vm start demo`` works on a fresh machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from kvmkit.qemu import guestkit, hotplug, migration, qemu_img, snapshot, vmstore
from kvmkit.qemu.config import Drive, MachineConfig, guest_kit_config
from kvmkit.qemu.console import SerialConsole
from kvmkit.qemu.errors import VmStateError
from kvmkit.qmp import ExecuteError, open_qmp

MIB = 2**20


def _store() -> vmstore.VmStore:
    return vmstore.VmStore()


def _run(fn: Callable[[], Awaitable[int]]) -> int:
    return trio.run(fn)


# -- start ------------------------------------------------------------------------------


def _config_from_args(args: argparse.Namespace, base: MachineConfig | None) -> MachineConfig:
    if base is None:
        if args.kernel:
            base = MachineConfig(kernel=args.kernel, initrd=args.initrd, append=args.append)
        else:
            progress = None if args.quiet else _kit_progress
            kit = guestkit.ensure_kit(progress=progress)
            base = guest_kit_config(kit)
        base.balloon = True
        base.memory_mib = 256
    for attr, value in (
        ("memory_mib", args.memory),
        ("cpus", args.cpus),
        ("maxcpus", args.maxcpus),
        ("machine", args.machine),
        ("accel", args.accel),
        ("network", args.network),
    ):
        if value is not None:
            setattr(base, attr, value)
    if args.maxmem is not None:
        base.maxmem_mib = args.maxmem
        base.memory_slots = max(base.memory_slots, 4)
    for disk in args.disk or []:
        path = Path(disk).resolve()
        if not path.exists():
            raise VmStateError(f"disk {disk} does not exist", hint="create it with qemu-img")
        if str(path) in {d.path for d in base.drives}:
            continue  # already part of this VM
        fmt = qemu_img.info(path)["format"]
        nodes = {d.node for d in base.drives}
        node = next(f"disk{i}" for i in range(len(nodes) + 1) if f"disk{i}" not in nodes)
        base.drives.append(Drive(str(path), format=fmt, node=node))
    base.validate()
    return base


def _kit_progress(step: str, done: int, total: int) -> None:
    print(f"guest kit: [{done}/{total}] {step}", file=sys.stderr, flush=True)


async def _start_record(record: vmstore.VmRecord, config: MachineConfig, wait: float) -> None:
    pid = await vmstore.spawn(record, config)
    accel = record.path("accel").read_text().strip()
    print(f"VM {record.name} started: pid {pid}, accelerator {accel}")
    kit_initrd = config.initrd and Path(config.initrd).is_relative_to(guestkit.kits_dir())
    if wait > 0 and kit_initrd:
        if await vmstore.wait_console_marker(record, guestkit.READY_MARKER, wait):
            print(f"VM {record.name}: guest ready")
        else:
            print(f"VM {record.name}: no ready marker within {wait:g} s", file=sys.stderr)


def cmd_start(args: argparse.Namespace) -> int:
    store = _store()
    existing = store.exists(args.name)
    record = store.get(args.name) if existing else None
    base = record.config if record is not None else None
    config = _config_from_args(args, base)

    async def main() -> int:
        nonlocal record
        created = record is None
        if record is None:
            record = store.create(args.name, config)
        try:
            with record.lock():
                state = record.state()
                if state == "running":
                    raise VmStateError(f"VM {args.name} is already running")
                if state == "dead":
                    record.clear_runtime()
                record.save_config(config)
                await _start_record(record, config, args.wait)
        except BaseException:
            if created:  # a VM that never ran is not kept defined
                shutil.rmtree(record.directory, ignore_errors=True)
            raise
        return 0

    return _run(main)


# -- list / info ------------------------------------------------------------------------


async def _live_status(record: vmstore.VmRecord) -> str:
    state = record.state()
    if state != "running":
        return state
    try:
        async with record.qmp(timeout=2.0) as qmp:
            return str((await qmp.execute("query-status"))["status"])
    except Exception:
        return "running (QMP busy)"


def cmd_list(args: argparse.Namespace) -> int:
    async def main() -> int:
        rows = []
        for record in _store().all():
            config = record.config
            rows.append(
                {
                    "name": record.name,
                    "state": await _live_status(record),
                    "pid": record.pid if record.state() == "running" else None,
                    "memory_mib": config.memory_mib,
                    "cpus": config.cpus,
                    "autostart": record.autostart,
                }
            )
        if args.json:
            print(json.dumps(rows))
            return 0
        print(f"{'NAME':20} {'STATE':12} {'PID':>8} {'MEM':>6} {'CPUS':>4} AUTOSTART")
        for r in rows:
            pid = r["pid"] or "-"
            auto = "yes" if r["autostart"] else "no"
            print(
                f"{r['name']:20} {r['state']:12} {pid:>8} {r['memory_mib']:>5}M {r['cpus']:>4} {auto}"
            )
        dead = [str(r["name"]) for r in rows if r["state"] == "dead"]
        if dead:
            print(f"dead VMs (QEMU exited): {', '.join(dead)}; `kvmkit vm cleanup` clears them")
        return 0

    return _run(main)


def cmd_info(args: argparse.Namespace) -> int:
    record = _store().get(args.name)

    async def main() -> int:
        info: dict[str, Any] = {
            "name": record.name,
            "directory": str(record.directory),
            "state": record.state(),
            "pid": record.pid,
            "autostart": record.autostart,
            "config": record.config.to_json(),
        }
        accel = record.path("accel")
        if accel.exists():
            info["accel"] = accel.read_text().strip()
        if record.state() == "running":
            async with record.qmp() as qmp:
                info["status"] = (await qmp.execute("query-status"))["status"]
                info["vcpus"] = len(await qmp.execute("query-cpus-fast"))
                info["memory_bytes"] = (await qmp.execute("query-memory-size-summary"))[
                    "base-memory"
                ]
                try:
                    info["balloon_mib"] = (await qmp.execute("query-balloon"))["actual"] / MIB
                except ExecuteError:
                    pass
                info["block"] = [
                    {"node": n["node-name"], "file": n["file"], "format": n["drv"]}
                    for n in await qmp.execute("query-named-block-nodes", {"flat": True})
                    if not n["node-name"].endswith("-file")
                ]
                info["hotplugged"] = record.hotplugged()
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            for key, value in info.items():
                if key != "config":
                    print(f"{key:14} {value}")
            cfg = info["config"]
            print(f"{'machine':14} {cfg['machine']}, {cfg['memory_mib']} MiB, {cfg['cpus']} CPUs")
            print(f"{'kernel':14} {cfg['kernel']}")
        return 0

    return _run(main)


# -- console ----------------------------------------------------------------------------


def cmd_console(args: argparse.Namespace) -> int:
    record = _store().get(args.name)
    if record.state() != "running":
        raise VmStateError(f"VM {args.name} is {record.state()}", hint="start it first")

    async def run_command() -> int:
        stream = await trio.open_unix_socket(str(record.path("console.sock")))
        console = SerialConsole(stream, name=f"{args.name} console")
        async with trio.open_nursery() as nursery:
            await console.start(nursery)
            try:
                output = await console.run(args.command, timeout=args.timeout, check=False)
            finally:
                await console.aclose()
        sys.stdout.write(output)
        return 0

    async def interactive() -> int:
        import termios
        import tty

        stream = await trio.open_unix_socket(str(record.path("console.sock")))
        print(f"connected to {args.name}'s serial console; Ctrl-] to leave", file=sys.stderr)
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
                        data = await trio.to_thread.run_sync(
                            os.read, fd, 1024, abandon_on_cancel=True
                        )
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
        print("\ndisconnected", file=sys.stderr)
        return 0

    return _run(run_command if args.command else interactive)


# -- simple QMP verbs -------------------------------------------------------------------


def _with_qmp(name: str, action: Callable[[Any, vmstore.VmRecord], Awaitable[int]]) -> int:
    record = _store().get(name)

    async def main() -> int:
        with record.lock():
            async with record.qmp() as qmp:
                return await action(qmp, record)

    return _run(main)


def cmd_suspend(args: argparse.Namespace) -> int:
    async def act(qmp: Any, record: vmstore.VmRecord) -> int:
        if (await qmp.execute("query-status"))["status"] != "paused":
            await qmp.execute_and_wait("stop", event="STOP", timeout=10)
        print(f"VM {record.name} suspended")
        return 0

    return _with_qmp(args.name, act)


def cmd_resume(args: argparse.Namespace) -> int:
    async def act(qmp: Any, record: vmstore.VmRecord) -> int:
        if (await qmp.execute("query-status"))["status"] != "running":
            await qmp.execute_and_wait("cont", event="RESUME", timeout=10)
        print(f"VM {record.name} resumed")
        return 0

    return _with_qmp(args.name, act)


def cmd_setmem(args: argparse.Namespace) -> int:
    async def act(qmp: Any, record: vmstore.VmRecord) -> int:
        actual = await hotplug.set_balloon(qmp, args.mib, timeout=args.timeout)
        print(f"VM {record.name}: balloon at {actual:.0f} MiB")
        return 0

    return _with_qmp(args.name, act)


def cmd_attach_disk(args: argparse.Namespace) -> int:
    path = Path(args.path).resolve()
    fmt = args.format or qemu_img.info(path)["format"]

    async def act(qmp: Any, record: vmstore.VmRecord) -> int:
        # On q35 this picks a free pcie-root-port; on pc, the root bus.
        disk = await hotplug.add_disk(qmp, str(path), fmt=fmt, disk_id=args.id)
        plugged = record.hotplugged()
        plugged[disk.id] = {"path": str(path), "format": fmt}
        record.save_hotplugged(plugged)
        print(f"VM {record.name}: attached {path} as {disk.id}")
        return 0

    return _with_qmp(args.name, act)


def cmd_detach_disk(args: argparse.Namespace) -> int:
    async def act(qmp: Any, record: vmstore.VmRecord) -> int:
        latency = await hotplug.remove_disk(qmp, args.id, timeout=args.timeout)
        plugged = record.hotplugged()
        plugged.pop(args.id, None)
        record.save_hotplugged(plugged)
        print(
            f"VM {record.name}: detached {args.id} (DEVICE_DELETED after {latency * 1000:.0f} ms)"
        )
        return 0

    return _with_qmp(args.name, act)


def _snapshot_nodes(record: vmstore.VmRecord) -> tuple[str, list[str]]:
    disks = [d for d in record.config.drives if d.format == "qcow2" and not d.readonly]
    if not disks:
        raise VmStateError(
            f"VM {record.name} has no writable qcow2 disk to hold snapshots",
            hint="start it with --disk IMAGE.qcow2",
        )
    return disks[0].node, [d.node for d in disks]


def cmd_snapshot(args: argparse.Namespace) -> int:
    async def act(qmp: Any, record: vmstore.VmRecord) -> int:
        vmstate, devices = _snapshot_nodes(record)
        if args.list:
            for snap in await snapshot.list_snapshots(qmp, vmstate):
                print(f"{snap['name']:20} {snap['vm-state-size'] / MIB:8.1f} MiB")
            return 0
        if args.delete:
            await snapshot.delete(qmp, args.tag, devices=devices)
            print(f"VM {record.name}: snapshot {args.tag} deleted")
            return 0
        if not args.tag:
            raise VmStateError("name the snapshot: kvmkit vm snapshot NAME TAG")
        await snapshot.save(qmp, args.tag, vmstate=vmstate, devices=devices)
        print(f"VM {record.name}: snapshot {args.tag} saved")
        return 0

    return _with_qmp(args.name, act)


def cmd_revert(args: argparse.Namespace) -> int:
    async def act(qmp: Any, record: vmstore.VmRecord) -> int:
        vmstate, devices = _snapshot_nodes(record)
        await snapshot.load(qmp, args.tag, vmstate=vmstate, devices=devices)
        print(f"VM {record.name}: reverted to {args.tag}")
        return 0

    return _with_qmp(args.name, act)


def cmd_qmp(args: argparse.Namespace) -> int:
    try:
        arguments = json.loads(args.arguments) if args.arguments else None
    except ValueError as exc:
        raise VmStateError(f"arguments are not valid JSON: {exc}") from exc

    async def act(qmp: Any, record: vmstore.VmRecord) -> int:
        try:
            reply = await qmp.execute(args.command, arguments)
        except ExecuteError as exc:
            print(f"kvmkit vm qmp: {args.command} failed: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(reply, indent=2))
        return 0

    return _with_qmp(args.name, act)


# -- stop -------------------------------------------------------------------------------


def _stop(args: argparse.Namespace, graceful: bool) -> int:
    record = _store().get(args.name)

    async def main() -> int:
        with record.lock(timeout=30):
            if record.state() == "shut off":
                print(f"VM {record.name} is not running")
                return 0
            step = await vmstore.stop_process(
                record, graceful=graceful, powerdown_timeout=getattr(args, "timeout", 30.0)
            )
        print(f"VM {record.name} stopped ({step})")
        return 0

    return _run(main)


def cmd_shutdown(args: argparse.Namespace) -> int:
    return _stop(args, graceful=True)


def cmd_destroy(args: argparse.Namespace) -> int:
    status = _stop(args, graceful=False)
    if args.undefine:
        _store().remove(args.name)
        print(f"VM {args.name} undefined")
    return status


def cmd_cleanup(args: argparse.Namespace) -> int:
    cleaned = _store().cleanup()
    print(f"cleaned up: {', '.join(cleaned)}" if cleaned else "nothing to clean up")
    return 0


# -- clone, autostart -------------------------------------------------------------------


def cmd_clone(args: argparse.Namespace) -> int:
    store = _store()
    source = store.get(args.name)
    if store.exists(args.new):
        raise VmStateError(f"a VM named {args.new} already exists")
    config = source.config
    with source.lock():
        if source.state() == "running":
            raise VmStateError(
                f"VM {args.name} is running", hint="shut it down first (disks must be quiet)"
            )
        record = store.create(args.new, MachineConfig.from_json(config.to_json()))
        new_config = record.config
        for drive in new_config.drives:
            src = Path(drive.path)
            dest = record.directory / f"{drive.node}.qcow2"
            if args.linked:
                qemu_img.create(dest, backing=src, backing_fmt=drive.format)
            else:
                qemu_img.convert(src, dest, in_fmt=drive.format)
            drive.path, drive.format = str(dest), "qcow2"
        record.save_config(new_config)
    kind = "linked clone (qcow2 overlays)" if args.linked else "full copy"
    print(f"VM {args.new} created from {args.name}: {kind}, {len(new_config.drives)} disk(s)")
    return 0


def cmd_autostart(args: argparse.Namespace) -> int:
    store = _store()
    if args.run:

        async def main() -> int:
            started = 0
            for record in store.all():
                if record.autostart and record.state() != "running":
                    with record.lock():
                        record.clear_runtime()
                        await _start_record(record, record.config, 0)
                    started += 1
            print(f"autostart: started {started} VM(s)")
            return 0

        return _run(main)
    if not args.name:
        raise VmStateError("name a VM, or use --run to start every autostart VM")
    record = store.get(args.name)
    record.set_autostart(not args.disable)
    print(f"VM {args.name}: autostart {'off' if args.disable else 'on'}")
    return 0


# -- migrate ----------------------------------------------------------------------------


def _migration_progress(json_mode: bool) -> migration.Progress:
    tty = sys.stderr.isatty()

    def show(info: dict[str, Any]) -> None:
        ram = info.get("ram", {})
        total = ram.get("total") or 1
        done = total - ram.get("remaining", total)
        line = (
            f"migrate: {info.get('status')} {100 * done / total:5.1f}% "
            f"{ram.get('transferred', 0) / MIB:7.1f} MiB sent, "
            f"{ram.get('mbps', 0):7.0f} Mbit/s, dirty sync {ram.get('dirty-sync-count', 0)}"
        )
        if tty:
            print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)
        elif not json_mode:
            print(line, file=sys.stderr, flush=True)

    return show


def cmd_migrate(args: argparse.Namespace) -> int:
    record = _store().get(args.name)
    options = migration.MigrationOptions(
        downtime_limit_ms=args.downtime_limit,
        max_bandwidth=args.bandwidth * MIB if args.bandwidth else None,
        postcopy=args.postcopy,
        auto_converge=args.auto_converge,
    )
    progress = _migration_progress(args.json)
    # The statistics carry the warnings; print them once, below, not as Python warnings.
    warnings.simplefilter("ignore", migration.MigrationWarning)

    async def main() -> int:
        with record.lock(timeout=30):
            async with record.qmp() as src:
                if args.uri:
                    stats = await migration.migrate(
                        src, args.uri, options=options, progress=progress
                    )
                else:
                    stats = await _migrate_local(record, src, options, progress)
        if sys.stderr.isatty():
            print(file=sys.stderr)
        if args.json:
            print(json.dumps(stats.to_json()))
        else:
            print(f"VM {record.name}: {stats.summary()}")
            for warning in stats.warnings:
                print(f"warning: {warning}", file=sys.stderr)
        return 0

    return _run(main)


async def _migrate_local(
    record: vmstore.VmRecord,
    src: Any,
    options: migration.MigrationOptions,
    progress: migration.Progress,
) -> migration.MigrationStats:
    """Migrate to a new QEMU in ``<vm>/incoming/`` and let it take over the VM's name:
    its sockets and pid file replace the old ones once the old QEMU has quit."""
    config = record.config
    # A fresh folder per migration: a QEMU unlinks its sockets by their original path when
    # it exits, so a reused path would lose the next QEMU's socket.
    for stale in record.directory.glob("incoming-*"):
        shutil.rmtree(stale, ignore_errors=True)
    subdir = f"incoming-{time.time_ns()}"
    incoming = record.directory / subdir
    old_pid = record.pid
    new_pid = await vmstore.spawn(record, config, incoming="defer", subdir=subdir)
    try:
        async with open_qmp(incoming / "qmp.sock") as dst:
            uri = await migration.prepare_incoming(
                dst, f"unix:{incoming / 'migrate.sock'}", options
            )
            stats = await migration.migrate(src, uri, options=options, dest=dst, progress=progress)
    except BaseException:
        with trio.CancelScope(shield=True):
            _kill(new_pid)
            shutil.rmtree(incoming, ignore_errors=True)
        raise
    # The old QEMU is paused in postmigrate: end it, then move the new one in.
    try:
        await src.execute("quit")
    except Exception:
        pass
    deadline = time.monotonic() + 10
    while old_pid and vmstore._pid_alive(old_pid) and time.monotonic() < deadline:
        await trio.sleep(0.05)
    if old_pid and vmstore._pid_alive(old_pid):
        _kill(old_pid)
    for name in ("qmp.sock", "console.sock", "qemu.pid", "accel"):
        (incoming / name).rename(record.path(name))
    # incoming/ keeps qemu.log; the next migration's clean-up removes it.
    return stats


def _kill(pid: int | None) -> None:
    import signal

    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    try:
        os.waitpid(pid, 0)  # reap it when this process started it
    except ChildProcessError:
        pass


# -- parser -----------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("vm", help="start, drive and migrate QEMU guests (virsh-like)")
    sub = parser.add_subparsers(dest="vm_command", metavar="ACTION", required=True)

    def verb(name: str, func: Callable[[argparse.Namespace], int], help: str) -> Any:
        p = sub.add_parser(name, help=help)
        p.set_defaults(func=func)
        return p

    p = verb("start", cmd_start, "define (if new) and start a VM")
    p.add_argument("name")
    p.add_argument("--kernel", help="kernel image (default: the guest kit)")
    p.add_argument("--initrd")
    p.add_argument("--append")
    p.add_argument("--memory", type=int, help="RAM in MiB (default 256)")
    p.add_argument("--maxmem", type=int, help="max RAM in MiB with hotplug slots")
    p.add_argument("--cpus", type=int)
    p.add_argument("--maxcpus", type=int)
    p.add_argument("--disk", action="append", help="disk image (repeatable)")
    p.add_argument("--machine", choices=("pc", "q35", "microvm"))
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"))
    p.add_argument("--network", choices=("none", "user"))
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the guest kit")
    p.add_argument("--quiet", action="store_true")

    p = verb("list", cmd_list, "list VMs")
    p.add_argument("--json", action="store_true")
    p = verb("info", cmd_info, "show a VM")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p = verb("console", cmd_console, "attach to the serial console (Ctrl-] leaves)")
    p.add_argument("name")
    p.add_argument(
        "--command", "-c", help="run one shell command in the guest and print its output"
    )
    p.add_argument("--timeout", type=float, default=30.0)
    for name, func, text in (
        ("suspend", cmd_suspend, "pause the VM"),
        ("resume", cmd_resume, "resume the VM"),
    ):
        verb(name, func, text).add_argument("name")
    p = verb("shutdown", cmd_shutdown, "ACPI power-off, then quit/SIGTERM/SIGKILL")
    p.add_argument("name")
    p.add_argument("--timeout", type=float, default=30.0)
    p = verb("destroy", cmd_destroy, "stop at once (no powerdown)")
    p.add_argument("name")
    p.add_argument("--undefine", action="store_true", help="also delete the VM's folder")
    verb("cleanup", cmd_cleanup, "clear the runtime files of VMs whose QEMU died")
    p = verb("setmem", cmd_setmem, "set the balloon target (MiB)")
    p.add_argument("name")
    p.add_argument("mib", type=int)
    p.add_argument("--timeout", type=float, default=30.0)
    p = verb("attach-disk", cmd_attach_disk, "hot-add a disk")
    p.add_argument("name")
    p.add_argument("path")
    p.add_argument("--format", choices=("qcow2", "raw"))
    p.add_argument("--id")
    p = verb("detach-disk", cmd_detach_disk, "hot-remove a disk (waits for DEVICE_DELETED)")
    p.add_argument("name")
    p.add_argument("id")
    p.add_argument("--timeout", type=float, default=15.0)
    p = verb("snapshot", cmd_snapshot, "save an internal snapshot (or --list / --delete)")
    p.add_argument("name")
    p.add_argument("tag", nargs="?")
    p.add_argument("--list", action="store_true")
    p.add_argument("--delete", action="store_true")
    p = verb("revert", cmd_revert, "revert to a snapshot")
    p.add_argument("name")
    p.add_argument("tag")
    p = verb("clone", cmd_clone, "copy a shut-off VM (full, or --linked qcow2 overlays)")
    p.add_argument("name")
    p.add_argument("new")
    p.add_argument("--linked", action="store_true")
    p = verb("migrate", cmd_migrate, "live-migrate (default: to a new local QEMU)")
    p.add_argument("name")
    p.add_argument("--uri", help="tcp:HOST:PORT, unix:PATH or exec:CMD")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("--downtime-limit", type=int, help="ms")
    p.add_argument("--bandwidth", type=int, help="MiB/s")
    p.add_argument("--postcopy", action="store_true")
    p.add_argument("--auto-converge", action="store_true")
    p = verb("autostart", cmd_autostart, "mark a VM for autostart; --run starts all marked")
    p.add_argument("name", nargs="?")
    p.add_argument("--disable", action="store_true")
    p.add_argument("--run", action="store_true")
    p = verb("qmp", cmd_qmp, "send one QMP command and print the reply")
    p.add_argument("name")
    p.add_argument("command")
    p.add_argument("arguments", nargs="?", help="JSON object")


__all__ = ["register"]
