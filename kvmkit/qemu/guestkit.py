"""The guest kit: a small real Linux guest for QEMU, built on demand and cached outside the
repository, keyed by kernel version.

A kit is a directory ``<cache>/guestkit/<kernel-version>/`` holding

- ``bzImage``: the kernel as packaged;
- ``vmlinux``: the ELF extracted from it, present only when it has a PVH entry (QEMU then
  boots it directly, which halves boot time under TCG);
- ``initrd.gz``: a gzip'd cpio initramfs with busybox-static, the virtio modules (in
  dependency order) and an init that mounts /proc, /sys, /dev, loads the modules, starts
  a busybox ``uevent`` hotplug watcher, prints :data:`READY_MARKER` on the serial console
  and runs a shell there;
- ``kit.json``: what went in.

The kernel comes from a Debian package fetched with ``apt-get download`` and unpacked
with ``dpkg-deb -x`` into a temporary directory (never installed on the host), or from a
kernel image and module tree the caller names.  The cache root is ``$KVMKIT_CACHE``, else
``$XDG_CACHE_HOME/kvmkit``, else ``~/.cache/kvmkit``.  Builds are safe to run
concurrently: each builds in a private temporary directory renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvmkit.qemu import cpio
from kvmkit.qemu.errors import GuestKitError
from kvmkit.qemu.kernel import extract_vmlinux, has_pvh_entry, index_modules, load_order

READY_MARKER = "KVMKIT-GUEST-READY"
PROMPT = "kvmkit# "
# button + evdev let busybox acpid see the ACPI power button (system_powerdown).
MODULES = (
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_balloon",
    "button",
    "evdev",
    # the emulated IDE disk of QEMU's pc (PIIX3 IDE -> libata -> SCSI disk): demo step io
    "ata_piix",
    "sd_mod",
)
# memhp_default_state=online_movable: hot-added memory can also be unplugged again.
KERNEL_APPEND = "console=ttyS0 rdinit=/init panic=-1 quiet memhp_default_state=online_movable"
KIT_FORMAT = 2

#: progress(step, done, total): ``step`` names the current step (one of BUILD_STEPS).
Progress = Callable[[str, int, int], None]
BUILD_STEPS = (
    "resolve kernel version",
    "download kernel package",
    "unpack kernel package",
    "extract PVH vmlinux",
    "collect modules",
    "pack initramfs",
    "install into cache",
)

INIT_SCRIPT = f"""#!/bin/sh
# kvmkit guest kit init: PID 1, then the shell on the serial console.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run /tmp /mnt
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp
while read -r mod; do
    insmod "/lib/modules/$mod.ko" || echo "kvmkit-init: insmod $mod failed"
done < /etc/kvmkit/modules
hostname kvmkit-guest
acpid -c /etc/acpi -l /run/acpid.log
# Event-driven hotplug watcher (one helper run per kernel uevent, no polling).
uevent /sbin/kvmkit-hotplug </dev/null >/dev/null 2>&1 &
for c in /sys/devices/system/cpu/cpu[1-9]*; do
    [ -w "$c/online" ] && [ "$(cat "$c/online")" = 0 ] && echo 1 > "$c/online"
done
export PS1='{PROMPT}'
echo "{READY_MARKER} $(uname -r)"
exec setsid cttyhack /bin/sh
"""

# Runs for every uevent with ACTION, SUBSYSTEM, DEVPATH (and DEVNAME) in the environment.
# It logs the event and does what udev would: online hot-added CPUs and memory.
HOTPLUG_SCRIPT = """#!/bin/sh
echo "$ACTION $SUBSYSTEM $DEVPATH ${DEVNAME:-}" >> /run/kvmkit-uevents
case "$ACTION/$SUBSYSTEM" in
add/cpu)
    f="/sys$DEVPATH/online"
    [ -w "$f" ] && [ "$(cat "$f")" = 0 ] && echo 1 > "$f"
    ;;
add/memory)
    f="/sys$DEVPATH/state"
    [ "$(cat "$f" 2>/dev/null)" = offline ] && echo online_movable > "$f"
    ;;
esac
exit 0
"""


POWEROFF_SCRIPT = """#!/bin/sh
echo "kvmkit-guest: power button, powering off" > /dev/console
sync
poweroff -f
"""


@dataclass(frozen=True)
class GuestKit:
    """A built, cached guest kit.  Paths are absolute and exist."""

    kernel_version: str
    directory: Path
    bzimage: Path
    initrd: Path
    vmlinux: Path | None
    modules: tuple[str, ...]
    source: str
    built_at: float
    append: str = KERNEL_APPEND
    size_bytes: int = field(default=0, compare=False)

    @property
    def kernel(self) -> Path:
        """The image to pass to ``-kernel``: the PVH ELF when there is one."""
        return self.vmlinux or self.bzimage

    @property
    def boots_pvh(self) -> bool:
        return self.vmlinux is not None


def cache_root() -> Path:
    """The kvmkit cache directory (not created)."""
    if env := os.environ.get("KVMKIT_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvmkit"


def kits_dir() -> Path:
    return cache_root() / "guestkit"


def _run(cmd: list[str], *, cwd: Path | None = None, timeout: float = 600) -> str:
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise GuestKitError(
            f"{cmd[0]} is not installed", hint="the guest kit needs apt and dpkg (Debian/Ubuntu)"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise GuestKitError(f"{' '.join(cmd)} did not finish within {timeout:.0f} s") from exc
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise GuestKitError(f"{' '.join(cmd)} failed with exit code {proc.returncode}: {tail}")
    return proc.stdout


def _apt_candidate() -> str | None:
    try:
        out = _run(["apt-cache", "depends", "linux-image-amd64"], timeout=60)
    except GuestKitError:
        return None
    match = re.search(r"Depends:\s+linux-image-(\S+-amd64)\b", out)
    return match.group(1) if match else None


def apt_kernel_version(*, update: bool = True) -> str:
    """The kernel release (e.g. ``6.1.0-56-amd64``) apt offers through the
    ``linux-image-amd64`` meta-package.  Runs ``apt-get update`` once when the package
    lists are empty and ``update`` is true (that needs root)."""
    version = _apt_candidate()
    if version is None and update:
        if os.geteuid() != 0:
            raise GuestKitError(
                "apt knows no linux-image-amd64 package",
                hint="run `sudo apt-get update`, or build from a kernel you name (--kernel)",
            )
        _run(["apt-get", "update"], timeout=600)
        version = _apt_candidate()
    if version is None:
        raise GuestKitError(
            "apt offers no linux-image-amd64 kernel",
            hint="on a non-Debian host, build from a kernel you name (--kernel, --modules)",
        )
    return version


def load_kit(directory: Path) -> GuestKit:
    """Read the kit in ``directory``; raises GuestKitError when it is not a complete kit."""
    try:
        meta = json.loads((directory / "kit.json").read_text())
    except (OSError, ValueError) as exc:
        raise GuestKitError(f"{directory} holds no complete guest kit: {exc}") from exc
    if meta.get("format") != KIT_FORMAT:
        raise GuestKitError(
            f"{directory} holds a guest kit of another format",
            hint="rebuild it with `kvmkit guest build --force`",
        )
    vmlinux = directory / "vmlinux"
    kit = GuestKit(
        kernel_version=meta["kernel_version"],
        directory=directory,
        bzimage=directory / "bzImage",
        initrd=directory / "initrd.gz",
        vmlinux=vmlinux if meta.get("pvh") and vmlinux.exists() else None,
        modules=tuple(meta["modules"]),
        source=meta["source"],
        built_at=meta["built_at"],
        append=meta.get("append", KERNEL_APPEND),
        size_bytes=sum(p.stat().st_size for p in directory.iterdir() if p.is_file()),
    )
    for path in (kit.bzimage, kit.initrd):
        if not path.exists():
            raise GuestKitError(f"guest kit {directory} lacks {path.name}")
    return kit


def _is_current(directory: Path) -> bool:
    try:
        load_kit(directory)
    except GuestKitError:
        return False
    return True


def cached_kits() -> list[GuestKit]:
    """Every complete kit in the cache, newest build first."""
    root = kits_dir()
    kits = []
    if root.is_dir():
        for entry in root.iterdir():
            if entry.is_dir() and not entry.name.startswith("."):
                try:
                    kits.append(load_kit(entry))
                except GuestKitError:
                    continue
    return sorted(kits, key=lambda k: k.built_at, reverse=True)


def find_kit(kernel_version: str | None = None) -> GuestKit | None:
    """The cached kit for ``kernel_version`` (or the newest cached one), if any."""
    if kernel_version is not None:
        try:
            return load_kit(kits_dir() / kernel_version)
        except GuestKitError:
            return None
    kits = cached_kits()
    return kits[0] if kits else None


def _busybox_path() -> Path:
    for candidate in ("/bin/busybox", "/usr/bin/busybox", shutil.which("busybox") or ""):
        if candidate and Path(candidate).exists():
            path = Path(candidate)
            if b"ld-linux" not in path.read_bytes()[:8192]:
                return path
    raise GuestKitError(
        "no static busybox found", hint="install it: `apt-get install busybox-static`"
    )


def _busybox_applets(busybox: Path) -> list[str]:
    out = _run([str(busybox), "--list"], timeout=30)
    return [a for a in out.split() if a and a != "busybox"]


def _initramfs_entries(busybox: Path, modules: list[tuple[str, bytes]]) -> list[cpio.Entry]:
    entries = [
        cpio.directory(d)
        for d in ("bin", "sbin", "dev", "etc", "etc/kvmkit", "lib", "lib/modules", "proc")
        + ("sys", "run", "tmp", "mnt", "root")
    ]
    entries += [cpio.chardev("dev/console", 5, 1), cpio.chardev("dev/null", 1, 3, 0o666)]
    entries.append(cpio.file("bin/busybox", busybox.read_bytes(), 0o755))
    for applet in _busybox_applets(busybox):
        entries.append(cpio.symlink(f"bin/{applet}", "busybox"))
    entries.append(cpio.file("init", INIT_SCRIPT.encode(), 0o755))
    entries.append(cpio.file("sbin/kvmkit-hotplug", HOTPLUG_SCRIPT.encode(), 0o755))
    # busybox acpid runs /etc/acpi/PWRF/00000080 when the power button is pressed.
    entries += [cpio.directory("etc/acpi"), cpio.directory("etc/acpi/PWRF")]
    entries.append(cpio.file("etc/acpi/PWRF/00000080", POWEROFF_SCRIPT.encode(), 0o755))
    entries.append(cpio.file("etc/kvmkit/modules", "".join(f"{n}\n" for n, _ in modules).encode()))
    for name, data in modules:
        entries.append(cpio.file(f"lib/modules/{name}.ko", data))
    return entries


def build_kit(
    kernel_version: str | None = None,
    *,
    kernel_image: Path | None = None,
    modules_dir: Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> GuestKit:
    """Build the guest kit (or return the cached one unless ``force``).

    Without ``kernel_image``, fetches the Debian kernel ``kernel_version`` (default: the
    one apt offers) with ``apt-get download``; with it, ``modules_dir`` must name the
    matching ``lib/modules/<version>`` tree and ``kernel_version`` the key to cache under
    (default: the tree's directory name).  Needs network access for the download.
    """
    total = len(BUILD_STEPS)

    def step(index: int) -> None:
        if progress is not None:
            progress(BUILD_STEPS[index], index, total)

    step(0)
    if kernel_image is not None:
        if modules_dir is None:
            raise GuestKitError("a named kernel needs its module tree too (--modules DIR)")
        kernel_version = kernel_version or Path(modules_dir).name
        source = f"file:{kernel_image}"
    elif kernel_version is None:
        kernel_version = apt_kernel_version()
    if kernel_image is None:
        source = f"debian:linux-image-{kernel_version}"
    if not force and (existing := find_kit(kernel_version)) is not None:
        if progress is not None:
            progress("cached", total, total)
        return existing

    root = kits_dir()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".build-{kernel_version}-", dir=root) as tmp_str:
        tmp = Path(tmp_str)
        out = tmp / "kit"
        out.mkdir()
        if kernel_image is None:
            step(1)
            pkg = f"linux-image-{kernel_version}"
            _run(["apt-get", "download", pkg], cwd=tmp, timeout=900)
            debs = sorted(tmp.glob(f"{pkg}_*.deb"))
            if not debs:
                raise GuestKitError(f"apt-get download {pkg} produced no .deb file")
            step(2)
            unpacked = tmp / "root"
            _run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], timeout=900)
            debs[0].unlink()
            images = sorted((unpacked / "boot").glob("vmlinuz-*"))
            if not images:
                raise GuestKitError(f"{pkg} contains no /boot/vmlinuz-*")
            kernel_image = images[0]
            modules_dir = unpacked / "lib" / "modules" / kernel_version
        assert modules_dir is not None
        if not Path(modules_dir).is_dir():
            raise GuestKitError(f"module tree {modules_dir} does not exist")

        step(3)
        image = Path(kernel_image).read_bytes()
        (out / "bzImage").write_bytes(image)
        vmlinux = extract_vmlinux(image)
        pvh = vmlinux is not None and has_pvh_entry(vmlinux)
        if pvh:
            assert vmlinux is not None
            (out / "vmlinux").write_bytes(vmlinux)
        del image, vmlinux

        step(4)
        modules = load_order(MODULES, index_modules(Path(modules_dir)))

        step(5)
        cpio.write_gzip(out / "initrd.gz", _initramfs_entries(_busybox_path(), modules))
        meta = {
            "format": KIT_FORMAT,
            "kernel_version": kernel_version,
            "source": source,
            "pvh": pvh,
            "modules": [n for n, _ in modules],
            "append": KERNEL_APPEND,
            "built_at": time.time(),
        }
        (out / "kit.json").write_text(json.dumps(meta, indent=2) + "\n")

        step(6)
        final = root / kernel_version
        if final.exists() and (force or not _is_current(final)):
            # Move the stale kit aside first so the swap below stays a single rename.
            try:
                final.rename(tmp / "old")
            except FileNotFoundError:
                pass
        try:
            out.rename(final)
        except OSError:
            # Another builder finished first: its kit is as good as ours.
            if not _is_current(final):
                raise
    if progress is not None:
        progress("done", total, total)
    return load_kit(root / kernel_version)


def ensure_kit(progress: Progress | None = None) -> GuestKit:
    """The newest cached kit, or a freshly built one when the cache is empty."""
    return find_kit() or build_kit(progress=progress)
