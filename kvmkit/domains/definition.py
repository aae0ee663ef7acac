"""A domain's persistent definition: what libvirt keeps as the domain XML, here as JSON.

One file per domain, ``<state>/vms/<name>/definition.json``, written atomically.  The
format (version 1)::

    {
      "version": 1,
      "name": "demo",
      "memory_mib": 512,           # max memory: the RAM QEMU boots with (virsh <memory>)
      "current_memory_mib": 384,   # balloon target after start (virsh <currentMemory>)
      "hotplug_memory_mib": null,  # ceiling for pc-dimm hotplug (virsh <maxMemory>)
      "memory_slots": 0,
      "vcpus": 1, "max_vcpus": null,
      "machine": "pc",             # pc | q35 | microvm
      "accel": "auto",             # auto | kvm | tcg
      "boot": {"kind": "kernel", "kernel": "/abs/vmlinux", "initrd": "/abs/initrd",
               "append": "console=ttyS0 ..."},
              # or {"kind": "disk", "ready_marker": true}: the firmware boots vda;
              # ready_marker says the installed system prints the guest kit's marker
      "display": "none",           # none | vnc (VNC on 127.0.0.1, see domdisplay)
      "disks": [{"source": "/abs/a.qcow2", "target": "vda", "format": "qcow2",
                 "bus": "virtio", "readonly": false}],
      "nics": [{"model": "virtio", "network": "user", "mac": "52:54:00:12:34:56"}],
      "autostart": false
    }

Every value is checked when a definition is read or built (:meth:`Definition.validate`):
a file that does not pass is refused with the field that is wrong, never half-used.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, cast

from kvmkit.domains.errors import DefinitionError
from kvmkit.qemu import config as qemu_config
from kvmkit.qemu import guestkit
from kvmkit.qemu.config import DISPLAYS, MAC, MACHINE_TYPES, Drive, MachineConfig, MachineType

VERSION = 1
MIB = 1 << 20
MIN_MEMORY_MIB = 16
MAX_MEMORY_MIB = 16 << 20  # 16 TiB
MAX_VCPUS = 255  # the pc/q35 limit without x2APIC/IOMMU tricks
MAX_NAME = 64
MAX_NICS = 8
#: Domain names: printable, no '/', no whitespace, not starting with '.' or '-'.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
#: virsh's disk targets for virtio: vda ... vdz, vdaa ...
TARGET = re.compile(r"vd[a-z]{1,2}")
DISK_FORMATS = ("qcow2", "raw")
DiskFormat = Literal["qcow2", "raw"]
ACCELS = ("auto", "kvm", "tcg")
NETWORKS = ("user",)


def validate_name(name: str) -> str:
    """``name`` if it can name a domain (a folder and a QEMU ``-name``), else a one-line
    DefinitionError."""
    if not isinstance(name, str) or not name:
        raise DefinitionError("a domain needs a name")
    if len(name) > MAX_NAME:
        raise DefinitionError(f"domain name is {len(name)} characters long (at most {MAX_NAME})")
    if not _NAME.fullmatch(name):
        raise DefinitionError(
            f"bad domain name {name!r}",
            hint="use letters, digits, '_', '.', '+', '-', not starting with '.' or '-'",
        )
    return name


def mib_from_bytes(size: int, what: str) -> int:
    """``size`` bytes as whole MiB (a DefinitionError when it is not whole or in range)."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise DefinitionError(f"{what} must be a whole number of bytes, not {size!r}")
    if size % MIB:
        raise DefinitionError(f"{what} must be a whole number of MiB (got {size} bytes)")
    mib = size // MIB
    _check_int(mib, what + " (MiB)", MIN_MEMORY_MIB, MAX_MEMORY_MIB)
    return mib


def _check_int(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DefinitionError(f"{what} must be a whole number, not {value!r}")
    if not low <= value <= high:
        raise DefinitionError(f"{what} is {value}, out of range [{low}, {high}]")
    return value


def _check_choice(value: Any, what: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise DefinitionError(f"{what} is {value!r}; use one of {', '.join(choices)}")
    return str(value)


def _check_path(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\n" in value or "\0" in value:
        raise DefinitionError(f"{what} must be an absolute path on one line, not {value!r}")
    return value


@dataclass
class Disk:
    """One disk: ``source`` image, the guest ``target`` name (``vdb``), its format."""

    source: str
    target: str
    format: str = "qcow2"
    bus: str = "virtio"
    readonly: bool = False

    def validate(self) -> None:
        _check_path(self.source, "disk source")
        if not TARGET.fullmatch(str(self.target)):
            raise DefinitionError(f"bad disk target {self.target!r}", hint="name it vda, vdb, ...")
        _check_choice(self.format, f"format of disk {self.target}", DISK_FORMATS)
        _check_choice(self.bus, f"bus of disk {self.target}", ("virtio",))
        if not isinstance(self.readonly, bool):
            raise DefinitionError(f"readonly of disk {self.target} must be true or false")


@dataclass
class Nic:
    """One network card: a virtio NIC on a QEMU user-mode network, named by its ``mac``
    (virsh's handle for ``detach-interface``).  A NIC without one (older definitions)
    is QEMU's ``nic0`` with QEMU's default MAC."""

    model: str = "virtio"
    network: str = "user"
    mac: str | None = None

    def validate(self) -> None:
        _check_choice(self.model, "NIC model", ("virtio",))
        _check_choice(self.network, "NIC network", NETWORKS)
        if self.mac is not None:
            check_mac(self.mac)


def check_mac(mac: Any) -> str:
    """``mac`` in QEMU's spelling (lower case) if it is a unicast MAC address."""
    text = str(mac).lower()
    if not MAC.fullmatch(text) or int(text[:2], 16) & 1:
        raise DefinitionError(
            f"bad MAC address {mac!r}", hint="a unicast address, e.g. 52:54:00:12:34:56"
        )
    return text


def new_mac(taken: set[str]) -> str:
    """A random MAC in QEMU's 52:54:00 range that is not in ``taken``."""
    while True:
        mac = "52:54:00:" + ":".join(f"{b:02x}" for b in os.urandom(3))
        if mac not in taken:
            return mac


@dataclass
class Boot:
    """``kind`` ``kernel`` (direct boot of ``kernel``/``initrd``/``append``) or ``disk``
    (the firmware boots the first disk; ``ready_marker`` when the system on it prints the
    guest kit's ready marker, as one installed from ``kvmkit guest iso`` does)."""

    kind: str = "kernel"
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    ready_marker: bool = False

    def validate(self) -> None:
        _check_choice(self.kind, "boot kind", ("kernel", "disk"))
        if self.kind == "kernel":
            _check_path(self.kernel, "boot kernel")
            if self.initrd is not None:
                _check_path(self.initrd, "boot initrd")
        elif self.kernel or self.initrd:
            raise DefinitionError("a disk boot names no kernel or initrd")
        if self.append is not None and ("\n" in self.append or "\0" in self.append):
            raise DefinitionError("the kernel command line must be one line")
        if not isinstance(self.ready_marker, bool):
            raise DefinitionError("boot ready_marker must be true or false")


@dataclass
class Definition:
    """A domain's definition (see the module docstring for the file format)."""

    name: str
    memory_mib: int = 256
    current_memory_mib: int | None = None  # None: all of memory_mib
    hotplug_memory_mib: int | None = None
    memory_slots: int = 0
    vcpus: int = 1
    max_vcpus: int | None = None
    machine: str = "pc"
    accel: str = "auto"
    boot: Boot = field(default_factory=Boot)
    disks: list[Disk] = field(default_factory=list)
    nics: list[Nic] = field(default_factory=list)
    autostart: bool = False
    display: str = "none"

    @property
    def current_mib(self) -> int:
        """The memory the guest gets after start (the balloon target)."""
        return self.current_memory_mib if self.current_memory_mib is not None else self.memory_mib

    def validate(self) -> Definition:
        """Check every field; returns ``self``.  Raises DefinitionError naming the first
        field that is wrong."""
        validate_name(self.name)
        _check_int(self.memory_mib, "memory (MiB)", MIN_MEMORY_MIB, MAX_MEMORY_MIB)
        _check_int(self.current_mib, "current memory (MiB)", MIN_MEMORY_MIB, self.memory_mib)
        if self.hotplug_memory_mib is not None:
            _check_int(
                self.hotplug_memory_mib, "hotplug memory (MiB)", self.memory_mib, MAX_MEMORY_MIB
            )
            _check_int(self.memory_slots, "memory slots", 1, 256)
        _check_int(self.vcpus, "vCPUs", 1, MAX_VCPUS)
        if self.max_vcpus is not None:
            _check_int(self.max_vcpus, "max vCPUs", self.vcpus, MAX_VCPUS)
        _check_choice(self.machine, "machine", MACHINE_TYPES)
        _check_choice(self.accel, "accelerator", ACCELS)
        _check_choice(self.display, "display", DISPLAYS)
        if not isinstance(self.autostart, bool):
            raise DefinitionError("autostart must be true or false")
        self.boot.validate()
        targets = [d.target for d in self.disks]
        for disk in self.disks:
            disk.validate()
        if len(set(targets)) != len(targets):
            raise DefinitionError(f"disk targets must be unique: {targets}")
        for nic in self.nics:
            nic.validate()
        if len(self.nics) > MAX_NICS:
            raise DefinitionError(f"{len(self.nics)} NICs; at most {MAX_NICS}")
        macs = [n.mac for n in self.nics if n.mac]
        if len(set(macs)) != len(macs):
            raise DefinitionError(f"NIC MAC addresses must be unique: {macs}")
        if sum(1 for n in self.nics if not n.mac) > 1:
            raise DefinitionError("at most one NIC without a MAC address")
        return self

    # -- lookups -------------------------------------------------------------------------

    def disk(self, target: str | None = None, source: str | None = None) -> Disk | None:
        """The disk with that ``target`` or ``source`` (resolved path), if any."""
        for disk in self.disks:
            if target is not None and disk.target == target:
                return disk
            if source is not None and disk.source == str(Path(source).resolve()):
                return disk
        return None

    def free_target(self, taken: set[str] | None = None) -> str:
        """The first ``vdX`` not used by this definition's disks or ``taken``."""
        used = {d.target for d in self.disks} | (taken or set())
        for index in range(26 * 27):
            name = _target_name(index)
            if name not in used:
                return name
        raise DefinitionError("no free disk target left")

    # -- JSON ------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: Any) -> Definition:
        """Read a version-1 definition; DefinitionError for anything else."""
        if not isinstance(data, dict):
            raise DefinitionError("a definition is a JSON object")
        if data.get("version") != VERSION:
            raise DefinitionError(
                f"definition version {data.get('version')!r} is not {VERSION}",
                hint="this kvmkit reads version 1 definitions",
            )
        values = {k: v for k, v in data.items() if k != "version"}
        values["boot"] = _build(Boot, values.get("boot", {}), "boot")
        disks, nics = values.get("disks", []), values.get("nics", [])
        if not isinstance(disks, list) or not isinstance(nics, list):
            raise DefinitionError("disks and nics must be lists")
        values["disks"] = [_build(Disk, d, "disk") for d in disks]
        values["nics"] = [_build(Nic, n, "nic") for n in nics]
        definition: Definition = _build(cls, values, "definition")
        return definition.validate()

    # -- QEMU ------------------------------------------------------------------------------

    def machine_config(
        self, qemu_name: str | None = None, *, cdrom: str | None = None
    ) -> MachineConfig:
        """The :class:`MachineConfig` QEMU starts from: ``-m memory_mib``, the disks by
        target (node name, device id and serial are the target), balloon always on.
        ``cdrom`` (an installer ISO) is attached and booted first."""
        self.validate()
        config = MachineConfig(
            name=qemu_name or self.name,
            machine=cast(MachineType, self.machine),  # validated above
            accel=self.accel,
            memory_mib=self.memory_mib,
            maxmem_mib=self.hotplug_memory_mib,
            memory_slots=self.memory_slots if self.hotplug_memory_mib else 0,
            cpus=self.vcpus,
            maxcpus=self.max_vcpus,
            kernel=self.boot.kernel if self.boot.kind == "kernel" else None,
            initrd=self.boot.initrd if self.boot.kind == "kernel" else None,
            append=self.boot.append if self.boot.kind == "kernel" else None,
            drives=[
                Drive(
                    d.source, format=cast(DiskFormat, d.format), node=d.target, readonly=d.readonly
                )
                for d in self.disks
            ],
            network="user" if any(not n.mac for n in self.nics) else "none",
            nics=[qemu_config.Nic(n.mac) for n in self.nics if n.mac],
            balloon=True,
            cdrom=cdrom,
            boot_order="d" if cdrom else None,
            display=self.display,
        )
        config.validate()
        return config


def _build(cls: Any, values: Any, what: str) -> Any:
    """``cls(**values)``, or a one-line DefinitionError naming unknown or missing keys."""
    if not isinstance(values, dict):
        raise DefinitionError(f"{what} must be a JSON object")
    known = {f.name for f in fields(cls)}
    unknown = sorted(repr(k) for k in values if k not in known)
    if unknown:
        raise DefinitionError(f"{what} has unknown fields: {', '.join(unknown)}")
    try:
        return cls(**values)
    except TypeError:  # a required field is missing
        missing = sorted(f.name for f in fields(cls) if f.name not in values)
        raise DefinitionError(f"{what} lacks fields: {', '.join(missing)}") from None


def _target_name(index: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    if index < 26:
        return "vd" + letters[index]
    return "vd" + letters[index // 26 - 1] + letters[index % 26]


def check_finite(value: float, what: str, low: float, high: float) -> float:
    """``value`` if it is a finite number in ``[low, high]``, else a DefinitionError."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DefinitionError(f"{what} must be a finite number, not {value!r}")
    if not low <= value <= high:
        raise DefinitionError(f"{what} is {value:g}, out of range [{low:g}, {high:g}]")
    return float(value)


def guest_kit_boot(progress: guestkit.Progress | None = None) -> Boot:
    """A kernel boot of the guest kit (built on first use; ``progress`` sees the build)."""
    kit = guestkit.ensure_kit(progress=progress)
    return Boot("kernel", str(kit.kernel), str(kit.initrd), kit.append)
