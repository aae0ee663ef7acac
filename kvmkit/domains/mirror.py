"""What a local migration destination must plug before the state arrives: the devices
hot-added to the source since its launch (disks, NICs, CPUs), so that both QEMUs have
the same devices at the same PCI addresses.

Disks and NICs are replayed in the order of their PCI address on the source (each
``device_add`` takes the first free slot, so that order gives the same slots); CPUs with
the socket/core/thread ids they have on the source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvmkit.domains import disks
from kvmkit.domains.errors import DomainError
from kvmkit.qemu import hotplug
from kvmkit.qemu.config import Drive, MachineConfig
from kvmkit.qmp import QMPClient


@dataclass
class HotDevices:
    """The destination's launch configuration and what to plug into it, in order."""

    config: MachineConfig
    plugs: list[tuple[str, Any]]  # ("disk", Drive) | ("nic", {"id", "mac"})
    cpus: list[dict[str, Any]]  # query-hotpluggable-cpus entries plugged by device_add


async def hot_devices(src: QMPClient, launched: MachineConfig) -> HotDevices:
    """Read the source's devices; refused (DomainError) when a device it was launched
    with is gone, since the destination's PCI slots would then differ."""
    config, hot_disks = disks.mirror_config(launched, await disks.live_disks(src))
    nics = await hotplug.nic_devices(src)
    booted = {n.id for n in launched.nics} | ({"nic0"} if launched.network == "user" else set())
    gone = booted - {n["id"] for n in nics}
    if gone:
        raise DomainError(
            f"NIC {sorted(gone)[0]} was detached from the running QEMU; a local migration"
            " would give the destination different PCI slots",
            hint="restart the domain first (its definition has the NICs it should have)",
        )
    slots = _pci_addresses(await src.execute("query-pci"))
    plugs: list[tuple[str, Any]] = [("disk", d) for d in hot_disks]
    plugs += [("nic", n) for n in nics if n["id"] not in booted]
    plugs.sort(key=lambda p: slots.get(p[1].node if p[0] == "disk" else p[1]["id"], (1 << 16,)))
    cpus = [
        c
        for c in await hotplug.hotpluggable_cpus(src)
        if str(c.get("qom-path", "")).startswith("/machine/peripheral/")
    ]
    return HotDevices(config, plugs, cpus)


async def replay(dest: QMPClient, hot: HotDevices) -> None:
    """Plug ``hot``'s CPUs, disks and NICs into the (paused, incoming) destination."""
    for cpu in hot.cpus:
        cpu_id = str(cpu["qom-path"]).rsplit("/", 1)[-1]
        await dest.execute("device_add", {"driver": cpu["type"], "id": cpu_id, **cpu["props"]})
    for kind, item in hot.plugs:
        if kind == "disk":
            drive: Drive = item
            await hotplug.add_disk(
                dest, drive.path, fmt=drive.format, disk_id=drive.node, readonly=drive.readonly
            )
        else:
            await hotplug.add_nic(dest, nic_id=item["id"], mac=item["mac"])


def _pci_addresses(buses: list[dict[str, Any]]) -> dict[str, tuple[int, ...]]:
    """Map each qdev id -> (bus, slot, function) of every PCI device, behind bridges too."""
    found: dict[str, tuple[int, ...]] = {}

    def walk(devices: list[dict[str, Any]]) -> None:
        for dev in devices:
            if dev.get("qdev_id"):
                found[dev["qdev_id"]] = (dev["bus"], dev["slot"], dev["function"])
            walk(dev.get("pci_bridge", {}).get("devices", []))

    for bus in buses:
        walk(bus.get("devices", []))
    return found
