"""Hotplug over QMP, each operation complete only when QEMU (and, given a console, the
guest) says so.

- PCI disks and NICs: ``blockdev-add``/``netdev_add`` + ``device_add``; removal waits for
  ``DEVICE_DELETED`` with the device's id and raises on ``DEVICE_UNPLUG_GUEST_ERROR`` or
  a timeout.  Compound steps are rolled back when a later step fails.
- CPUs from ``query-hotpluggable-cpus``, plugged in core-id order.  Unplug is refused on
  QEMU <= 7.2 under TCG, where it leaves QEMU to crash on the next CPU plug.
- Memory: ``object-add`` of a RAM backend + ``pc-dimm``, the backend deleted again if
  ``device_add`` fails.
- Balloon: set a target and wait for the guest's actual size to reach it.

Every function takes a connected :class:`kvmkit.qmp.QMPClient`.  Passing ``console`` (the
guest kit's :class:`SerialConsole`, at its prompt) also waits for the guest to see the
change.  Removing a device from a paused VM is refused: the guest must acknowledge the
eject, so ``device_del`` would never complete.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass
from typing import Any

import trio

from kvmkit.qemu.console import SerialConsole
from kvmkit.qemu.errors import HotplugError, UnsupportedOperation
from kvmkit.qmp import ExecuteError, QMPClient, QMPTimeoutError

_ids = itertools.count(1)
MIB = 2**20


def _new_id(prefix: str) -> str:
    return f"{prefix}{next(_ids)}"


async def guest_wait(console: SerialConsole, condition: str, timeout: float = 20.0) -> None:
    """Wait (inside the guest, 0.1 s steps) until the shell ``condition`` holds; raises
    HotplugError if it still fails after ``timeout`` seconds."""
    steps = max(1, int(timeout / 0.1))
    script = (
        f"t=0; while ! {{ {condition}; }} 2>/dev/null; do t=$((t+1)); "
        f'[ "$t" -lt {steps} ] || break; sleep 0.1; done; {{ {condition}; }} 2>/dev/null'
    )
    try:
        await console.run(script, timeout=timeout + 15)
    except HotplugError:
        raise
    except Exception as exc:
        raise HotplugError(f"the guest did not see the change ({condition}): {exc}") from exc


async def _require_running(qmp: QMPClient, what: str) -> None:
    status = (await qmp.execute("query-status"))["status"]
    if status != "running":
        raise UnsupportedOperation(
            f"cannot {what} while the VM is {status}",
            hint="device_del needs the guest to acknowledge the eject; resume the VM first",
        )


async def _execute(qmp: QMPClient, what: str, cmd: str, args: dict[str, Any]) -> Any:
    try:
        return await qmp.execute(cmd, args)
    except ExecuteError as exc:
        raise HotplugError(f"{what}: {cmd} failed: {exc}") from exc


async def remove_device(qmp: QMPClient, device_id: str, *, timeout: float = 15.0) -> float:
    """``device_del`` and wait for ``DEVICE_DELETED`` of ``device_id``; returns the seconds
    from the command to the event.  Raises HotplugError on ``DEVICE_UNPLUG_GUEST_ERROR``
    or when no event comes within ``timeout``, UnsupportedOperation on a paused VM."""
    await _require_running(qmp, f"remove {device_id}")
    start = time.perf_counter()
    # DEVICE_DELETED also comes for ".../virtio-backend" without a "device" key: match id.
    async with qmp.listen(
        "DEVICE_DELETED", "DEVICE_UNPLUG_GUEST_ERROR", match={"device": device_id}
    ) as events:
        await _execute(qmp, f"remove {device_id}", "device_del", {"id": device_id})
        try:
            event = await events.get(timeout)
        except QMPTimeoutError:
            raise HotplugError(
                f"{device_id}: no DEVICE_DELETED within {timeout:g} s after device_del",
                hint="the guest did not release the device; it may still do so later",
            ) from None
    if event["event"] == "DEVICE_UNPLUG_GUEST_ERROR":
        raise HotplugError(f"the guest refused to release {device_id}: {event['data']}")
    return time.perf_counter() - start


async def device_ids(qmp: QMPClient, path: str = "/machine/peripheral") -> list[str]:
    """Ids of the user-created devices (``-device``/``device_add`` with an id)."""
    props = await qmp.execute("qom-list", {"path": path})
    return sorted(p["name"] for p in props if str(p.get("type", "")).startswith("child<"))


async def free_hotplug_bus(qmp: QMPClient) -> str | None:
    """The id of an empty hotplug root port (``hp<N>``, as kvmkit adds on q35), or None
    when the machine has none (``pc``: devices go on the root bus, which hotplugs).
    Raises HotplugError when root ports exist but all are taken."""
    ports: list[tuple[str, bool]] = []
    for bus in await qmp.execute("query-pci"):
        for dev in bus.get("devices", []):
            bridge = dev.get("pci_bridge")
            if bridge is not None and str(dev.get("qdev_id", "")).startswith("hp"):
                ports.append((dev["qdev_id"], bool(bridge.get("devices"))))
    if not ports:
        return None
    for port, used in sorted(ports):
        if not used:
            return port
    raise HotplugError(
        f"all {len(ports)} hotplug root ports are in use",
        hint="remove a device or start the VM with more hotplug_ports",
    )


# -- block devices ----------------------------------------------------------------------


async def blockdev_add(
    qmp: QMPClient, path: str, *, node: str, fmt: str = "qcow2", readonly: bool = False
) -> None:
    """Add the protocol node ``<node>-file`` and the format node ``node`` for ``path``."""
    await _execute(
        qmp,
        f"open {path}",
        "blockdev-add",
        {
            "driver": "file",
            "filename": str(path),
            "node-name": f"{node}-file",
            "read-only": readonly,
        },
    )
    try:
        await _execute(
            qmp,
            f"open {path}",
            "blockdev-add",
            {"driver": fmt, "file": f"{node}-file", "node-name": node, "read-only": readonly},
        )
    except HotplugError:
        await _blockdev_del_quietly(qmp, f"{node}-file")
        raise


async def blockdev_del(qmp: QMPClient, node: str) -> None:
    """Delete the format node ``node`` and its protocol node ``<node>-file``."""
    await _execute(qmp, f"close {node}", "blockdev-del", {"node-name": node})
    await _blockdev_del_quietly(qmp, f"{node}-file")


async def _blockdev_del_quietly(qmp: QMPClient, node: str) -> None:
    with contextlib.suppress(ExecuteError):
        await qmp.execute("blockdev-del", {"node-name": node})


@dataclass
class PluggedDisk:
    """A hot-added disk: its device id (also its node name) and, when a console was
    given, the guest's name for it (``vdb``) and the seconds until the guest saw it."""

    id: str
    guest_name: str | None = None
    seconds: float = 0.0


async def add_disk(
    qmp: QMPClient,
    path: str,
    *,
    fmt: str = "qcow2",
    disk_id: str | None = None,
    bus: str | None = None,
    readonly: bool = False,
    driver: str = "virtio-blk-pci",
    console: SerialConsole | None = None,
    timeout: float = 20.0,
) -> PluggedDisk:
    """Hot-add ``path`` as a virtio disk.  ``bus`` defaults to a free ``hp<N>`` root
    port where the machine has them (q35), else the root bus.  The device's serial is its id, so the guest can find it in
    ``/sys/block/vd*/serial``."""
    disk_id = disk_id or _new_id("hd")
    if len(disk_id) > 20:
        raise HotplugError(f"disk id {disk_id!r} is longer than virtio's 20-character serial")
    start = time.perf_counter()
    await blockdev_add(qmp, path, node=disk_id, fmt=fmt, readonly=readonly)
    args: dict[str, Any] = {"driver": driver, "id": disk_id, "drive": disk_id, "serial": disk_id}
    if bus is None and driver.endswith("-pci"):
        try:
            bus = await free_hotplug_bus(qmp)
        except HotplugError:
            await blockdev_del(qmp, disk_id)
            raise
    if bus:
        args["bus"] = bus
    try:
        await _execute(qmp, f"attach {path}", "device_add", args)
    except HotplugError:
        await blockdev_del(qmp, disk_id)
        raise
    plugged = PluggedDisk(disk_id)
    if console is not None:
        cond = f"grep -qx {disk_id} /sys/block/vd*/serial"
        await guest_wait(console, cond, timeout)
        out = await console.run(
            f"grep -lx {disk_id} /sys/block/vd*/serial | cut -d/ -f4", timeout=timeout
        )
        plugged.guest_name = out.strip() or None
    plugged.seconds = time.perf_counter() - start
    return plugged


async def remove_disk(qmp: QMPClient, disk_id: str, *, timeout: float = 15.0) -> float:
    """Unplug the disk ``disk_id`` (waiting for DEVICE_DELETED) and close its nodes;
    returns the unplug latency in seconds."""
    latency = await remove_device(qmp, disk_id, timeout=timeout)
    await blockdev_del(qmp, disk_id)
    return latency


async def add_nic(
    qmp: QMPClient,
    *,
    nic_id: str | None = None,
    bus: str | None = None,
    driver: str = "virtio-net-pci",
    console: SerialConsole | None = None,
    timeout: float = 20.0,
    mac: str | None = None,
) -> str:
    """Hot-add a NIC (MAC ``mac``, default one of kvmkit's) on a new user-mode netdev
    ``<id>-net``; returns the device id.  With ``console``, waits for a new interface
    with the NIC's MAC in the guest."""
    nic_id = nic_id or _new_id("nic")
    if mac is None:
        serial = next(_ids)
        mac = f"52:54:00:4b:{(serial >> 8) & 0xFF:02x}:{serial & 0xFF:02x}"
    await _execute(qmp, "add netdev", "netdev_add", {"type": "user", "id": f"{nic_id}-net"})
    args: dict[str, Any] = {"driver": driver, "id": nic_id, "netdev": f"{nic_id}-net", "mac": mac}
    if bus is None and driver.endswith("-pci"):
        try:
            bus = await free_hotplug_bus(qmp)
        except HotplugError:
            await _netdev_del_quietly(qmp, f"{nic_id}-net")
            raise
    if bus:
        args["bus"] = bus
    try:
        await _execute(qmp, "add NIC", "device_add", args)
    except HotplugError:
        await _netdev_del_quietly(qmp, f"{nic_id}-net")
        raise
    if console is not None:
        await guest_wait(console, f"grep -qx {mac} /sys/class/net/*/address", timeout)
    return nic_id


async def nic_devices(qmp: QMPClient) -> list[dict[str, str]]:
    """``{"id", "mac"}`` of every virtio NIC created with an id (``-device``/
    ``device_add``), by id."""
    found = []
    for prop in await qmp.execute("qom-list", {"path": "/machine/peripheral"}):
        if str(prop.get("type", "")) in ("child<virtio-net-pci>", "child<virtio-net-device>"):
            path = f"/machine/peripheral/{prop['name']}"
            mac = await qmp.execute("qom-get", {"path": path, "property": "mac"})
            found.append({"id": prop["name"], "mac": str(mac).lower()})
    return sorted(found, key=lambda n: n["id"])


async def _netdev_del_quietly(qmp: QMPClient, netdev: str) -> None:
    with contextlib.suppress(ExecuteError):
        await qmp.execute("netdev_del", {"id": netdev})


async def remove_nic(qmp: QMPClient, nic_id: str, *, timeout: float = 15.0) -> float:
    latency = await remove_device(qmp, nic_id, timeout=timeout)
    await _netdev_del_quietly(qmp, f"{nic_id}-net")
    return latency


# -- CPUs -------------------------------------------------------------------------------


async def hotpluggable_cpus(qmp: QMPClient) -> list[dict[str, Any]]:
    """``query-hotpluggable-cpus``, sorted by socket, core and thread id."""
    cpus = await qmp.execute("query-hotpluggable-cpus")

    def key(cpu: dict[str, Any]) -> tuple[int, ...]:
        props = cpu.get("props", {})
        return tuple(props.get(k, 0) for k in ("socket-id", "die-id", "core-id", "thread-id"))

    return sorted(cpus, key=key)


async def add_cpu(
    qmp: QMPClient,
    *,
    cpu_id: str | None = None,
    console: SerialConsole | None = None,
    timeout: float = 30.0,
) -> str:
    """Plug the first free CPU slot (lowest ids first: out of order, the guest stalls
    onlining it) and return its device id.  With ``console``, waits until the guest has
    it online (the guest kit's uevent watcher onlines it)."""
    cpus = await hotpluggable_cpus(qmp)
    free = [c for c in cpus if "qom-path" not in c]
    if not free:
        raise HotplugError(
            f"no free CPU slot: all {len(cpus)} are plugged", hint="start with a higher maxcpus"
        )
    slot = free[0]
    cpu_id = cpu_id or _new_id("cpu")
    args = {"driver": slot["type"], "id": cpu_id, **slot["props"]}
    await _execute(qmp, "plug a CPU", "device_add", args)
    if console is not None:
        want = len(cpus) - len(free) + 1
        await guest_wait(console, f'[ "$(grep -c ^processor /proc/cpuinfo)" -ge {want} ]', timeout)
    return cpu_id


async def cpu_unplug_problem(qmp: QMPClient) -> str | None:
    """Why CPU unplug is unsafe on this QEMU, or None when it is believed safe."""
    version = (await qmp.execute("query-version"))["qemu"]
    kvm = await qmp.execute("query-kvm")
    if not kvm.get("enabled") and (version["major"], version["minor"]) <= (7, 2):
        return (
            f"CPU hot-unplug under TCG is broken in QEMU {version['major']}.{version['minor']}: "
            "the guest ejects the CPU, only the lapic's DEVICE_DELETED arrives, and the next "
            "CPU device_add crashes QEMU"
        )
    return None


async def remove_cpu(qmp: QMPClient, cpu_id: str, *, timeout: float = 15.0) -> float:
    """Unplug the CPU ``cpu_id``; refused up front where QEMU cannot do it safely."""
    problem = await cpu_unplug_problem(qmp)
    if problem:
        raise UnsupportedOperation(
            f"refusing to unplug {cpu_id}: {problem}",
            hint="use KVM or a newer QEMU, or restart the VM with fewer CPUs",
        )
    return await remove_device(qmp, cpu_id, timeout=timeout)


# -- memory -----------------------------------------------------------------------------


async def _mem_total_kib(console: SerialConsole) -> int:
    out = await console.run("grep MemTotal /proc/meminfo")
    return int(out.split()[1])


async def add_memory(
    qmp: QMPClient,
    size_mib: int,
    *,
    dimm_id: str | None = None,
    console: SerialConsole | None = None,
    timeout: float = 30.0,
) -> str:
    """Plug ``size_mib`` of RAM as a ``pc-dimm`` backed by ``mem-<id>``; returns the DIMM
    id.  The backend is deleted again if ``device_add`` fails.  With ``console``, waits
    until the guest's MemTotal has grown by (nearly) that much."""
    dimm_id = dimm_id or _new_id("dimm")
    backend = f"mem-{dimm_id}"
    before = await _mem_total_kib(console) if console is not None else 0
    await _execute(
        qmp,
        f"add {size_mib} MiB",
        "object-add",
        {"qom-type": "memory-backend-ram", "id": backend, "size": size_mib * MIB},
    )
    try:
        await _execute(
            qmp,
            f"add {size_mib} MiB",
            "device_add",
            {"driver": "pc-dimm", "id": dimm_id, "memdev": backend},
        )
    except HotplugError as exc:
        try:
            await qmp.execute("object-del", {"id": backend})
        except ExecuteError as undo:
            raise HotplugError(f"{exc}; rolling back object {backend} also failed: {undo}") from exc
        raise
    if console is not None:
        want = before + size_mib * 1024 * 9 // 10
        await guest_wait(
            console,
            f"[ \"$(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)\" -ge {want} ]",
            timeout,
        )
    return dimm_id


async def remove_memory(qmp: QMPClient, dimm_id: str, *, timeout: float = 15.0) -> float:
    """Unplug the DIMM ``dimm_id`` (the guest must have onlined it movable) and delete
    its backend; returns the unplug latency."""
    latency = await remove_device(qmp, dimm_id, timeout=timeout)
    await _execute(qmp, f"remove {dimm_id}", "object-del", {"id": f"mem-{dimm_id}"})
    return latency


# -- balloon ----------------------------------------------------------------------------


async def balloon_actual_mib(qmp: QMPClient) -> float:
    try:
        reply = await qmp.execute("query-balloon")
    except ExecuteError as exc:
        raise HotplugError(f"no balloon: {exc}", hint="start the VM with balloon=True") from exc
    return float(reply["actual"]) / MIB


async def set_balloon(
    qmp: QMPClient, target_mib: int, *, timeout: float = 30.0, tolerance_mib: float = 2.0
) -> float:
    """Ask the balloon for ``target_mib`` of guest RAM and wait until the guest's actual
    size is within ``tolerance_mib`` of it; returns the actual size in MiB."""
    actual = await balloon_actual_mib(qmp)
    await _execute(qmp, "balloon", "balloon", {"value": target_mib * MIB})
    with trio.move_on_after(timeout):
        while abs(actual - target_mib) > tolerance_mib:
            # BALLOON_CHANGE is rate-limited to 1/s; polling query-balloon is finer.
            await trio.sleep(0.2)
            actual = await balloon_actual_mib(qmp)
        return actual
    raise HotplugError(
        f"balloon did not reach {target_mib} MiB within {timeout:g} s (actual {actual:.0f} MiB)",
        hint="the guest needs virtio_balloon loaded and enough free memory",
    )
