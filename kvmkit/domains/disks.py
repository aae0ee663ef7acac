"""Disks of a domain, named as virsh names them: a ``target`` (``vdb``) and a ``source``.

The target is also the QEMU block node name, the device id and the virtio serial, so a
running QEMU's block nodes give ``domblklist`` directly and the guest finds a disk by
``/sys/block/vd*/serial``.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

from kvmkit.domains.definition import TARGET, Definition, Disk, validate_name
from kvmkit.domains.errors import DefinitionError, DomainError
from kvmkit.domains.store import DomainStore
from kvmkit.qemu import qemu_img
from kvmkit.qemu.config import Drive, MachineConfig
from kvmkit.qmp import QMPClient


async def live_disks(qmp: QMPClient) -> list[dict[str, Any]]:
    """Target, source, format and read-only flag (``ro``) of every disk of the running
    QEMU (its format nodes), oldest first."""
    nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
    found = [
        {"target": n["node-name"], "source": n["file"], "format": n["drv"], "ro": n["ro"]}
        for n in nodes
        if TARGET.fullmatch(str(n.get("node-name", "")))
    ]
    return found[::-1]  # QEMU lists the newest node first


def mirror_config(
    launched: MachineConfig, live: list[dict[str, Any]]
) -> tuple[MachineConfig, list[Drive]]:
    """A migration destination's configuration for a QEMU launched from ``launched``
    whose disks are now ``live``: the launch drives still present, and (to hot-add on
    the destination, in this order) the drives added since.  Refused when a launch
    drive was removed: the destination's PCI slots would then differ from the source's."""
    targets = [d["target"] for d in live]
    gone = [d.node for d in launched.drives if d.node not in targets]
    if gone:
        raise DomainError(
            f"disk {gone[0]} was detached from the running QEMU; a local migration would"
            " give the destination different PCI slots",
            hint="restart the domain first (its definition has the disks it should have)",
        )
    config = copy.deepcopy(launched)
    booted = {d.node for d in launched.drives}
    hot = [
        Drive(d["source"], format=d["format"], node=d["target"], readonly=bool(d["ro"]))
        for d in live
        if d["target"] not in booted
    ]
    return config, hot


def find(listed: list[dict[str, Any]], target: str | None, source: str | Path | None) -> str:
    """The target of the disk named by ``target`` or by ``source`` in ``listed``."""
    if (target is None) == (source is None):
        raise DomainError("name the disk by its target (vdb) or by --source PATH, not both")
    wanted = str(Path(source).resolve()) if source is not None else None
    for disk in listed:
        if disk["target"] == target or (wanted is not None and disk["source"] == wanted):
            return str(disk["target"])
    what = f"target {target}" if target is not None else f"source {wanted}"
    known = ", ".join(f"{d['target']} ({d['source']})" for d in listed) or "none"
    raise DomainError(f"no disk with {what}; disks: {known}")


def new_disk(
    definition: Definition,
    source: str | Path,
    target: str | None,
    fmt: str | None,
    readonly: bool,
    taken: set[str],
) -> Disk:
    """A validated :class:`Disk` for ``source`` (which must be a regular file) at
    ``target`` (default: the first ``vdX`` free in ``definition`` and in ``taken``);
    the format is read with qemu-img when not given."""
    path = Path(source).resolve()
    if not path.is_file():
        raise DomainError(f"disk {source} is not a regular file", hint="create it with qemu-img")
    target = target or definition.free_target(taken)
    if definition.disk(target=target) is not None or target in taken:
        raise DomainError(f"target {target} is already in use")
    disk = Disk(str(path), target, fmt or str(qemu_img.info(path)["format"]), readonly=readonly)
    try:
        disk.validate()
    except DefinitionError as exc:
        raise DefinitionError(f"cannot attach {source}: {exc}") from None
    return disk


def clone_domain(store: DomainStore, source: Definition, new_name: str, *, linked: bool) -> None:
    """Define ``new_name`` as a copy of ``source`` whose disks are copies (or qcow2
    overlays, ``linked``) in the new domain's folder; nothing is left on failure."""
    validate_name(new_name)
    if store.exists(new_name):
        raise DomainError(f"a domain named {new_name} already exists")
    clone = copy.deepcopy(source)
    clone.name, clone.autostart = new_name, False
    folder = store.folder(new_name)
    store.save_definition(clone)
    try:
        for disk in clone.disks:
            dest = folder / f"{disk.target}.qcow2"
            if linked:
                qemu_img.create(dest, backing=disk.source, backing_fmt=disk.format)
            else:
                qemu_img.convert(disk.source, dest, in_fmt=disk.format)
            disk.source, disk.format = str(dest), "qcow2"
        store.save_definition(clone)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
