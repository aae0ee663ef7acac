"""A QEMU machine's configuration and the command line it turns into.

:func:`build_command` is pure: it takes the configuration and the paths of the sockets
and files the launcher set up, and returns the argument list.  Nothing here starts a
process.

No value reaches an option string as it is: QEMU's option parser splits at commas, so a
path like ``/d/real.img,locking=off`` would add an option.  :func:`opt_value` doubles
the commas (QEMU's escape), and disks go in as JSON (``-blockdev '{...}'``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kvmkit.qemu.errors import QemuError
from kvmkit.qemu.guestkit import GuestKit

MachineType = Literal["pc", "q35", "microvm"]
Network = Literal["none", "user"]
MACHINE_TYPES: tuple[str, ...] = ("pc", "q35", "microvm")
DISPLAYS: tuple[str, ...] = ("none", "vnc")
#: ``-boot order=``: a floppy, c first hard disk, d CD-ROM, n network.
_BOOT_ORDER = re.compile(r"[acdn]{1,4}")
#: ``-vnc 127.0.0.1:0,to=99``: QEMU takes the first free display 5900..5999 itself (no
#: race between picking a port and binding it); ``query-vnc`` says which.
VNC_DISPLAYS = 99
#: Node names and device ids: QEMU's identifier rule (a letter, then letters, digits,
#: '-', '.', '_'; at most 31 characters in block node names).
_QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}")


def opt_value(value: object) -> str:
    """``value`` made safe inside a QEMU ``key=value,...`` option string (commas
    doubled); a value with a newline or NUL, which no option can carry, is refused."""
    text = str(value)
    if "\n" in text or "\0" in text:
        raise QemuError(f"{text!r} cannot be passed to QEMU (newline or NUL in it)")
    return text.replace(",", ",,")


@dataclass
class Drive:
    """A disk attached at start.  ``node`` names its block node and its device id."""

    path: str
    format: Literal["qcow2", "raw"] = "qcow2"
    node: str = ""
    readonly: bool = False

    def __post_init__(self) -> None:
        self.path = str(self.path)


#: A MAC address as QEMU and virsh write it; QEMU's locally administered prefix 52:54:00.
MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def nic_id(mac: str) -> str:
    """The QEMU device id of the NIC with ``mac`` (its netdev is ``<id>-net``)."""
    return "nic-" + mac.replace(":", "")


@dataclass
class Nic:
    """A virtio NIC on its own user-mode netdev: device ``nic-<mac digits>``, netdev
    ``<device id>-net``."""

    mac: str

    @property
    def id(self) -> str:
        return nic_id(self.mac)


@dataclass
class MachineConfig:
    """Everything needed to start one QEMU guest.

    ``accel`` is ``None``/``"auto"`` (kvm where it can run a Linux guest, else tcg),
    ``"kvm"`` or ``"tcg"``.  ``maxmem_mib``/``memory_slots`` enable memory hotplug;
    ``maxcpus`` > ``cpus`` enables CPU hotplug; ``hotplug_ports`` adds that many
    ``pcie-root-port``s on q35 (pcie.0 itself refuses hotplug).  ``microvm`` uses
    virtio-mmio devices and has no hotplug; under TCG on QEMU 7.2 the guest kit's kernel
    was seen to hang early in about 1 of 10-15 microvm boots (stuck idle, no timer
    interrupt), so prefer ``pc`` or ``q35`` where boots must not fail.
    """

    name: str = "kvmkit"
    machine: MachineType = "pc"
    accel: str | None = None
    memory_mib: int = 256
    maxmem_mib: int | None = None
    memory_slots: int = 0
    cpus: int = 1
    maxcpus: int | None = None
    cpu_model: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    drives: list[Drive] = field(default_factory=list)
    network: Network = "none"
    balloon: bool = False
    cdrom: str | None = None
    boot_order: str | None = None
    display: str = "none"
    nics: list[Nic] = field(default_factory=list)
    hotplug_ports: int = 4
    extra_args: list[str] = field(default_factory=list)
    qemu_binary: str = "qemu-system-x86_64"

    def validate(self) -> None:
        """Raise QemuError when the configuration cannot describe a valid machine."""
        if self.machine not in MACHINE_TYPES:
            raise QemuError(
                f"unknown machine type {self.machine!r}", hint=f"use one of {MACHINE_TYPES}"
            )
        if self.memory_mib < 16:
            raise QemuError(f"memory {self.memory_mib} MiB is too small (at least 16 MiB)")
        if self.maxmem_mib is not None:
            if self.maxmem_mib < self.memory_mib:
                raise QemuError(
                    f"maxmem {self.maxmem_mib} MiB is below memory {self.memory_mib} MiB"
                )
            if self.memory_slots < 1:
                raise QemuError("maxmem needs at least one memory slot (memory_slots)")
        if self.cpus < 1 or (self.maxcpus is not None and self.maxcpus < self.cpus):
            raise QemuError(f"bad CPU counts: cpus={self.cpus} maxcpus={self.maxcpus}")
        if self.machine == "microvm" and self.maxmem_mib is not None:
            raise QemuError("microvm has no memory hotplug", hint="use machine pc or q35")
        nodes = [d.node for d in self.drives]
        if len(set(nodes)) != len(nodes):
            raise QemuError(f"drive node names must be unique: {nodes}")
        for node in nodes:
            if not _QEMU_ID.fullmatch(node):
                raise QemuError(
                    f"bad drive node name {node!r}",
                    hint="a letter, then letters, digits, '-', '.', '_' (at most 31)",
                )
        if self.initrd and not self.kernel:
            raise QemuError("an initrd needs a kernel")
        macs = [n.mac for n in self.nics]
        for mac in macs:
            if not MAC.fullmatch(str(mac)) or int(str(mac)[:2], 16) & 1:
                raise QemuError(f"bad MAC address {mac!r}", hint="unicast, e.g. 52:54:00:12:34:56")
        if len(set(macs)) != len(macs):
            raise QemuError(f"NIC MAC addresses must be unique: {macs}")
        if self.display not in DISPLAYS:
            raise QemuError(f"unknown display {self.display!r}", hint=f"use one of {DISPLAYS}")
        if self.boot_order is not None and not _BOOT_ORDER.fullmatch(self.boot_order):
            raise QemuError(
                f"bad boot order {self.boot_order!r}", hint="letters of c (disk), d (CD-ROM), n"
            )
        if self.machine == "microvm" and (self.cdrom or self.display != "none"):
            raise QemuError("microvm has no IDE CD-ROM and no VGA", hint="use machine pc or q35")

    def __post_init__(self) -> None:
        for index, drive in enumerate(self.drives):
            if not drive.node:
                drive.node = f"disk{index}"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MachineConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["drives"] = [Drive(**d) for d in values.get("drives", [])]
        values["nics"] = [Nic(**n) for n in values.get("nics", [])]
        return cls(**values)

    @property
    def pci(self) -> bool:
        return self.machine != "microvm"

    def virtio(self, kind: str) -> str:
        """The device type for virtio ``kind`` (``blk``, ``net``, ``balloon``) here."""
        return f"virtio-{kind}-pci" if self.pci else f"virtio-{kind}-device"


def guest_kit_config(kit: GuestKit, **overrides: Any) -> MachineConfig:
    """A configuration that boots the guest kit ``kit`` (PVH ELF where it has one);
    ``overrides`` set any other :class:`MachineConfig` field."""
    values: dict[str, Any] = {
        "kernel": str(kit.kernel),
        "initrd": str(kit.initrd),
        "append": kit.append,
    }
    values.update(overrides)
    return MachineConfig(**values)


def hotplug_port(index: int) -> str:
    """The id of the ``index``-th q35 hotplug root port."""
    return f"hp{index}"


def build_command(
    config: MachineConfig,
    *,
    accel: str,
    qmp_socket: Path,
    console_socket: Path,
    qmp_fd: int | None = None,
    console_log: Path | None = None,
    pidfile: Path | None = None,
    paused: bool = True,
    incoming: str | None = None,
) -> list[str]:
    """The QEMU argument list for ``config``.

    The QMP monitor listens on ``qmp_socket`` (or talks over the connected socket
    ``qmp_fd`` the caller passes to QEMU) and the serial console (ttyS0) on
    ``console_socket``, both as servers that do not wait for a client; ``console_log``
    additionally receives every byte the guest writes to the console.  ``paused`` adds
    ``-S`` so the caller can connect before the guest runs.  ``incoming`` (e.g.
    ``"defer"``) starts a migration destination.
    """
    config.validate()
    machine = config.machine
    machine_opts: str = machine
    if machine == "microvm":
        machine_opts += ",acpi=on"
    cmd = [config.qemu_binary, "-name", f"{opt_value(config.name)},debug-threads=on"]
    cmd += ["-machine", machine_opts, "-accel", accel]
    cmd += ["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]
    if config.display == "vnc":
        # Loopback only; a VGA card for the screen (-nodefaults leaves none).
        cmd += ["-vnc", f"127.0.0.1:0,to={VNC_DISPLAYS}", "-device", "VGA,id=video0"]
    if config.boot_order:
        cmd += ["-boot", f"order={config.boot_order}"]
    cpu_model = config.cpu_model or ("host" if accel == "kvm" else "qemu64")
    cmd += ["-cpu", cpu_model]
    mem = f"{config.memory_mib}M"
    if config.maxmem_mib is not None:
        mem += f",slots={config.memory_slots},maxmem={config.maxmem_mib}M"
    cmd += ["-m", mem]
    smp = str(config.cpus)
    if config.maxcpus is not None and config.maxcpus != config.cpus:
        smp += f",maxcpus={config.maxcpus}"
    cmd += ["-smp", smp]
    if config.kernel:
        cmd += ["-kernel", str(config.kernel)]
    if config.initrd:
        cmd += ["-initrd", str(config.initrd)]
    if config.append:
        cmd += ["-append", config.append]

    if qmp_fd is not None:
        cmd += ["-chardev", f"socket,id=qmp0,fd={qmp_fd}", "-mon", "chardev=qmp0,mode=control"]
    else:
        cmd += ["-qmp", f"unix:{opt_value(qmp_socket)},server=on,wait=off"]
    chardev = f"socket,id=serial0,path={opt_value(console_socket)},server=on,wait=off"
    if console_log is not None:
        chardev += f",logfile={opt_value(console_log)},logappend=on"
    cmd += ["-chardev", chardev, "-serial", "chardev:serial0"]
    if pidfile is not None:
        cmd += ["-pidfile", str(pidfile)]

    if machine == "q35":
        for index in range(config.hotplug_ports):
            port = hotplug_port(index)
            cmd += ["-device", f"pcie-root-port,id={port},chassis={index + 1},bus=pcie.0"]
    for drive in config.drives:
        cmd += ["-blockdev", _blockdev_json(drive, "file"), "-blockdev", _blockdev_json(drive)]
        # The serial is the node name: the guest finds it in /sys/block/vd*/serial.
        device = f"{config.virtio('blk')},drive={drive.node},id={drive.node},serial={drive.node}"
        cmd += ["-device", device]
    if config.cdrom:
        cdrom = Drive(config.cdrom, format="raw", node="cdrom0", readonly=True)
        cmd += ["-blockdev", _blockdev_json(cdrom, "file"), "-blockdev", _blockdev_json(cdrom)]
        cmd += ["-device", "ide-cd,drive=cdrom0,id=cdrom0"]
    if config.network == "user":
        cmd += ["-netdev", "user,id=net0", "-device", f"{config.virtio('net')},netdev=net0,id=nic0"]
    for nic in config.nics:
        cmd += ["-netdev", f"user,id={nic.id}-net"]
        cmd += ["-device", f"{config.virtio('net')},netdev={nic.id}-net,id={nic.id},mac={nic.mac}"]
    if config.balloon:
        cmd += ["-device", f"{config.virtio('balloon')},id=balloon0"]
    if paused:
        cmd.append("-S")
    if incoming is not None:
        cmd += ["-incoming", incoming]
    cmd += list(config.extra_args)
    return cmd


def _blockdev_json(drive: Drive, layer: str = "format") -> str:
    """``-blockdev`` for ``drive`` as JSON (no option-string parsing of the path): the
    protocol node ``<node>-file`` for ``layer="file"``, else the format node."""
    if drive.format not in ("qcow2", "raw"):
        raise QemuError(f"unknown disk format {drive.format!r}", hint="use qcow2 or raw")
    spec: dict[str, str | bool]
    if layer == "file":
        spec = {"driver": "file", "filename": drive.path, "node-name": f"{drive.node}-file"}
    else:
        spec = {"driver": drive.format, "file": f"{drive.node}-file", "node-name": drive.node}
    spec["read-only"] = drive.readonly
    return json.dumps(spec)


def format_command(cmd: list[str]) -> str:
    """``cmd`` as one line a user can paste into a shell."""
    return shlex.join(cmd)
