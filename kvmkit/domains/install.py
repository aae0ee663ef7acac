"""Install a domain from an ISO onto a new disk (virt-install's ``--cdrom`` path).

::

    spec = parse_disk_spec("size=2G,format=qcow2")
    report = await create(Definition("demo", memory_mib=1024), "/tmp/i.iso", spec)
    await Domain("demo").start()          # boots vda through SeaBIOS

:func:`create` defines the domain with a disk boot, creates its disk with ``qemu-img``,
boots the ISO through the firmware (SeaBIOS, IDE CD-ROM, ``-boot order=d``) in a QEMU
this process owns, and returns when the guest powers off (QEMU runs with ``-no-reboot``,
so an installer's final reboot ends it too).  kvmkit's own installer
(:mod:`kvmkit.qemu.installer`) reports its steps on the serial console; they reach
``progress`` and a reported failure is an :class:`InstallError`.  Any other installer is
waited for until it powers off (with ``display="vnc"`` in the definition, ``progress``
first gets ``display vnc://...``: where to watch a graphical one).  On failure or cancellation the domain and the
disk it created are removed, and the error carries the console's last lines; after a
successful install the console output is kept in ``<domain>/install.log``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from kvmkit.domains.definition import Boot, Definition, Disk, check_finite
from kvmkit.domains.domain import vnc_uri
from kvmkit.domains.errors import DomainError, InstallError
from kvmkit.domains.store import DomainStore
from kvmkit.qemu import installer, qemu_img
from kvmkit.qemu.machine import QemuMachine
from kvmkit.sizes import MiB, SizeError, parse_size

#: progress(what, step, total): total is 0 for an installer that reports no steps.
Progress = Callable[[str, int, int], None]
MIN_DISK = 16 * MiB


@dataclass(frozen=True)
class DiskSpec:
    """virt-install's ``--disk size=2G,format=qcow2[,path=/x.qcow2]``."""

    size: int
    format: str = "qcow2"
    path: str | None = None


def parse_disk_spec(text: str) -> DiskSpec:
    """Read ``size=SIZE[,format=qcow2|raw][,path=PATH]`` (a bare size is in GiB, as
    virt-install reads it); DomainError saying what is wrong."""
    values: dict[str, str] = {}
    for item in str(text).split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in ("size", "format", "path") or key in values:
            raise DomainError(
                f"bad disk option {item!r} in {text!r}",
                hint="write size=2G,format=qcow2 (optionally ,path=/abs/disk.qcow2)",
            )
        values[key] = value
    if "size" not in values:
        raise DomainError(f"--disk {text!r} has no size", hint="e.g. size=2G,format=qcow2")
    try:
        size = parse_size(values["size"], "G", minimum=MIN_DISK)
    except SizeError as exc:
        raise DomainError(f"disk size: {exc}") from None
    fmt = values.get("format", "qcow2")
    if fmt not in ("qcow2", "raw"):
        raise DomainError(f"disk format {fmt!r}", hint="use qcow2 or raw")
    path = values.get("path")
    if path is not None:
        if not path or "\n" in path or "\0" in path:
            raise DomainError(f"bad disk path {path!r}")
        path = str(Path(path).absolute())
    return DiskSpec(size, fmt, path)


@dataclass
class InstallReport:
    """The outcome of an install: the new disk, how long it took, which installer ran."""

    name: str
    disk: str
    disk_size: int
    seconds: float
    installer: str  # "kvmkit" (its markers were seen) or "other"
    console_log: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


async def create(
    definition: Definition,
    cdrom: str | Path,
    disk: DiskSpec,
    *,
    store: DomainStore | None = None,
    progress: Progress | None = None,
    timeout: float = 1800.0,
) -> InstallReport:
    """Define ``definition`` (its name must be free; its disks and boot are replaced by
    the new disk, ``vda``, and a disk boot), create the disk and run the installer on
    ``cdrom`` until the guest powers off, within ``timeout`` seconds."""
    check_finite(timeout, "timeout (s)", 1, 86400)
    store = store or DomainStore()
    iso = Path(cdrom).absolute()  # noqa: ASYNC240 - getcwd, no disk access
    if not iso.is_file():  # noqa: ASYNC240 - one local stat before anything starts
        raise DomainError(f"no ISO at {iso}", hint="build one with `kvmkit guest iso OUT.iso`")
    if store.exists(definition.name):
        raise DomainError(f"a domain named {definition.name} already exists")
    folder = store.folder(definition.name)
    path = Path(disk.path) if disk.path else folder / f"{definition.name}.{disk.format}"
    if path.exists():
        raise DomainError(f"{path} exists already", hint="name a new file with path=")
    definition.boot = Boot("disk")
    definition.disks = [Disk(str(path), "vda", disk.format)]
    store.save_definition(definition)
    created = False
    try:
        with store.lock(definition.name):
            qemu_img.create(path, disk.size, fmt=disk.format)
            created = True
            started = time.monotonic()
            log = folder / "install.log"
            kind = await _run_installer(definition, iso, log, progress, timeout)
            definition.boot = Boot("disk", ready_marker=kind == "kvmkit")
            store.save_definition(definition)
    except BaseException:
        if created and disk.path:
            path.unlink(missing_ok=True)
        store.remove(definition.name)
        raise
    return InstallReport(
        definition.name, str(path), disk.size, time.monotonic() - started, kind, str(log)
    )


async def _run_installer(
    definition: Definition,
    iso: Path,
    log: Path,
    progress: Progress | None,
    timeout: float,
) -> str:
    """Boot ``iso`` and wait for the guest to power off; returns ``"kvmkit"`` when kvmkit's
    installer reported success, ``"other"`` for an installer that said nothing."""
    log.unlink(missing_ok=True)  # noqa: ASYNC240 - one unlink in the domain's run folder
    config = definition.machine_config(cdrom=str(iso))
    config.balloon = False
    machine = QemuMachine(config, console_log=log, powerdown_timeout=1.0)
    shown = 0
    start = time.monotonic()
    async with machine:
        if config.display == "vnc" and progress is not None:
            progress(f"display {await vnc_uri(machine.qmp)}", 0, 0)
        while True:
            try:
                await machine.wait_exit(0.5)
                break
            except trio.TooSlowError:
                pass
            elapsed = time.monotonic() - start
            reports = installer.scan_console(machine.console.transcript)
            if progress is not None:
                for kind, step, what in reports[shown:]:
                    progress(what or kind, step, installer.INSTALL_STEPS)
                if not reports:
                    progress(f"installer running ({elapsed:.0f} s)", 0, 0)
            shown = len(reports)
            if elapsed > timeout:
                raise InstallError(
                    f"the installer of {definition.name} did not finish within {timeout:g} s",
                    hint=_last_output(machine),
                )
        reports = installer.scan_console(machine.console.transcript)
        last_output = _last_output(machine)
    report = reports[-1] if reports else None
    if report is not None and report[0] == "failed":
        raise InstallError(f"the installer failed: {report[2]}", hint=last_output)
    if report is not None and report[0] != "done":
        raise InstallError(
            f"the installer stopped at step {report[1]} ({report[2]}) without finishing",
            hint=last_output,
        )
    if progress is not None:
        progress("powered off", installer.INSTALL_STEPS, installer.INSTALL_STEPS)
    return "kvmkit" if report is not None else "other"


def _last_output(machine: QemuMachine) -> str:
    """The installer's last console lines, for an error (the domain's folder, and the
    install.log in it, is removed when the install fails)."""
    tail = machine.console.tail(5).strip()
    return f"its console ended: {tail!r}" if tail else "it printed nothing on ttyS0"
