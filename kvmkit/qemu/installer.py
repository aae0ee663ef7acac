"""The project's own installer ISO (``kvmkit guest iso OUT.iso``), built from Debian packages.

A real BIOS install, small enough to run under TCG in a minute or two::

    ISO (xorriso, El Torito no-emulation boot)
      isolinux/isolinux.bin + ldlinux.c32      (Debian isolinux, syslinux-common)
      boot/vmlinuz                              the Debian kernel of the guest kit
      boot/install.gz                           installer initramfs:
          busybox, virtio + ext4 modules, sfdisk (fdisk) and mke2fs (e2fsprogs) and
          extlinux (extlinux) with their shared libraries from this host,
          payload/: vmlinuz, initrd.gz (the installed system's initramfs), rootfs.cpio.gz,
          mbr.bin (syslinux's MBR boot code), and /init = :data:`INSTALL_SCRIPT`.

The installer partitions the first virtio disk (one bootable Linux partition, MBR label,
``sfdisk``), makes ext4 on it (``mke2fs -O ^64bit,^metadata_csum``: syslinux 6.04 reads
neither feature), unpacks the root file system (busybox and the guest kit's init, which
prints :data:`~kvmkit.qemu.guestkit.READY_MARKER` and runs a shell on ttyS0), copies the
kernel and a small initramfs that mounts ``/dev/vda1`` and ``switch_root``s into it,
installs extlinux into ``/boot/extlinux`` and syslinux's MBR into the disk's first 440
bytes, then powers off.  It reports each step on the serial console as
``KVMKIT-INSTALL-STEP n/N what`` and ends with :data:`DONE_MARKER` or
``KVMKIT-INSTALL-FAILED: why`` (then powers off too, so a failed install never hangs).
"""

from __future__ import annotations

import gzip
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from kvmkit.qemu import cpio, guestkit
from kvmkit.qemu.errors import GuestKitError
from kvmkit.qemu.kernel import index_modules, load_order

DONE_MARKER = "KVMKIT-INSTALL-DONE"
FAILED_MARKER = "KVMKIT-INSTALL-FAILED"
STEP_MARKER = "KVMKIT-INSTALL-STEP"
INSTALL_STEPS = 6
#: The disk the installer writes and the installed system's root partition.
TARGET_DISK = "/dev/vda"
ROOT_PARTITION = "/dev/vda1"
INSTALL_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")
#: Loaded by the installed system's initramfs: the guest kit's set plus the root fs.
BOOT_MODULES = (*guestkit.MODULES, "crc32c_generic", "ext4")
#: Host programs the installer runs (copied with the shared libraries ``ldd`` names).
HOST_TOOLS = {
    "sbin/sfdisk": ("sfdisk", "fdisk"),
    "sbin/mke2fs": ("mke2fs", "e2fsprogs"),
    "sbin/extlinux": ("extlinux", "extlinux"),
}
#: Boot files from Debian's syslinux packages: (path on the host, package).
ISOLINUX_BIN = ("/usr/lib/ISOLINUX/isolinux.bin", "isolinux")
LDLINUX_C32 = ("/usr/lib/syslinux/modules/bios/ldlinux.c32", "syslinux-common")
MBR_BIN = ("/usr/lib/EXTLINUX/mbr.bin", "extlinux")
MKE2FS_CONF = "/etc/mke2fs.conf"
BOOT_APPEND = f"console=ttyS0 root={ROOT_PARTITION} panic=-1 quiet"
BOOT_APPEND += " memhp_default_state=online_movable"

Progress = guestkit.Progress
ISO_STEPS = (
    "resolve kernel version",
    "download kernel package",
    "unpack kernel package",
    "build root file system",
    "build installer initramfs",
    "write ISO (xorriso)",
)

_COMMON_INIT = """#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r mod; do
    insmod "/lib/modules/$mod.ko" || echo "kvmkit: insmod $mod failed"
done < /etc/kvmkit/modules
wait_block() {  # wait_block DEV: up to 20 s for the kernel to create DEV
    i=0
    while [ ! -b "$1" ]; do
        i=$((i + 1)); [ $i -gt 100 ] && return 1; sleep 0.2
    done
}
"""

INSTALL_SCRIPT = (
    _COMMON_INIT
    + f"""step() {{ echo "{STEP_MARKER} $1/{INSTALL_STEPS} $2"; }}
fail() {{ echo "{FAILED_MARKER}: $*"; sync; poweroff -f; sleep 60; }}
# Full paths: busybox's shell runs its own applets (mke2fs, ...) before $PATH.
disk={TARGET_DISK}
part={ROOT_PARTITION}
step 1 "find the disk $disk"
wait_block $disk || fail "no disk $disk (attach a virtio disk)"
step 2 "partition $disk (sfdisk, MBR, one bootable Linux partition)"
echo ',,L,*' | /sbin/sfdisk -q --label dos $disk || fail "sfdisk $disk"
wait_block $part || fail "no partition $part after sfdisk"
step 3 "make ext4 on $part (mke2fs)"
/sbin/mke2fs -q -F -t ext4 -O ^64bit,^metadata_csum -L kvmkit-root $part || fail "mke2fs $part"
step 4 "copy the root file system"
mkdir -p /target
mount -t ext4 $part /target || fail "mount $part"
(cd /target && zcat /payload/rootfs.cpio.gz | cpio -idm 2>/dev/null) || fail "unpack root"
mkdir -p /target/boot/extlinux
cp /payload/vmlinuz /payload/initrd.gz /target/boot/ || fail "copy kernel"
cat > /target/boot/extlinux/extlinux.conf <<EOF
SERIAL 0 115200
DEFAULT kvmkit
PROMPT 0
TIMEOUT 1
LABEL kvmkit
  LINUX /boot/vmlinuz
  INITRD /boot/initrd.gz
  APPEND {BOOT_APPEND}
EOF
step 5 "install the boot loader (extlinux, syslinux MBR)"
/sbin/extlinux --install /target/boot/extlinux || fail "extlinux --install"
dd if=/payload/mbr.bin of=$disk bs=440 count=1 conv=notrunc 2>/dev/null || fail "write MBR"
step 6 "power off"
umount /target || fail "umount $part"
sync
echo "{DONE_MARKER}"
poweroff -f
sleep 60
"""
)

BOOT_SCRIPT = (
    _COMMON_INIT
    + f"""root={ROOT_PARTITION}
for arg in $(cat /proc/cmdline); do
    case "$arg" in root=/dev/*) root="${{arg#root=}}" ;; esac
done
mkdir -p /newroot
if ! wait_block "$root" || ! mount -t ext4 "$root" /newroot; then
    echo "kvmkit-boot: cannot mount $root; here is a shell"
    exec sh
fi
umount /proc /sys
umount -l /dev
exec switch_root /newroot /init
"""
)


def _require(path: str, package: str) -> Path:
    if not Path(path).exists():
        raise GuestKitError(f"{path} is missing", hint=f"install it: `apt-get install {package}`")
    return Path(path)


class _Tree:
    """cpio entries with every parent directory listed before its children."""

    def __init__(self) -> None:
        self.entries: list[cpio.Entry] = []
        self.dirs: set[str] = set()

    def add(self, entry: cpio.Entry) -> None:
        parts = entry.name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.mkdir("/".join(parts[:i]))
        if entry.name in self.dirs:
            return
        if stat.S_ISDIR(entry.mode):
            self.dirs.add(entry.name)
        self.entries.append(entry)

    def mkdir(self, name: str) -> None:
        if name and name not in self.dirs:
            self.dirs.add(name)
            self.entries.append(cpio.directory(name))

    def extend(self, entries: list[cpio.Entry]) -> None:
        for entry in entries:
            self.add(entry)


def _shared_libraries(binary: Path) -> list[Path]:
    """The shared libraries (and the dynamic loader) ``binary`` needs, from ``ldd``."""
    out = subprocess.run(
        ["ldd", str(binary)], capture_output=True, text=True, timeout=60, check=False
    ).stdout
    libs = []
    for line in out.splitlines():
        words = line.split()
        if "=>" in words and len(words) > words.index("=>") + 1:
            candidate = words[words.index("=>") + 1]
        elif words and words[0].startswith("/"):
            candidate = words[0]
        else:
            continue
        if candidate.startswith("/"):
            libs.append(Path(candidate))
    return libs


def _host_tools() -> list[cpio.Entry]:
    """The installer's host programs and their libraries, at their host paths."""
    entries: dict[str, cpio.Entry] = {}
    for dest, (command, package) in HOST_TOOLS.items():
        found = shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin")
        if found is None:
            raise GuestKitError(
                f"{command} is not installed", hint=f"install it: `apt-get install {package}`"
            )
        entries[dest] = cpio.file(dest, Path(found).read_bytes(), 0o755)
        for lib in _shared_libraries(Path(found)):
            name = str(lib).lstrip("/")
            entries.setdefault(name, cpio.file(name, lib.read_bytes(), 0o755))
    return list(entries.values())


def _base(busybox: Path, init: str, modules: list[tuple[str, bytes]]) -> _Tree:
    """The guest kit's busybox tree with ``init`` as /init and ``modules`` to load."""
    tree = _Tree()
    for entry in guestkit._initramfs_entries(busybox, modules):
        tree.add(cpio.file("init", init.encode(), 0o755) if entry.name == "init" else entry)
    return tree


def root_filesystem(
    busybox: Path, kernel_version: str, tools: list[cpio.Entry]
) -> list[cpio.Entry]:
    """The installed system: the guest kit's busybox tree and init (no modules: the boot
    initramfs loaded them), ``tools`` (sfdisk, mke2fs and ``mkfs.ext4``, which busybox
    lacks, for the course's fdisk/mkfs.ext4/mount on a new disk), /etc/os-release, an
    empty /boot."""
    tree = _base(busybox, guestkit.INIT_SCRIPT, [])
    tree.extend(tools)
    tree.add(cpio.symlink("sbin/mkfs.ext4", "mke2fs"))
    if Path(MKE2FS_CONF).exists():
        tree.add(cpio.file("etc/mke2fs.conf", Path(MKE2FS_CONF).read_bytes()))
    release = (
        'PRETTY_NAME="kvmkit guest (busybox, installed from the kvmkit ISO)"\n'
        'NAME="kvmkit guest"\nID=kvmkit\nVERSION_ID=1\n'
        f'KERNEL="{kernel_version}"\n'
    )
    tree.add(cpio.file("etc/os-release", release.encode()))
    tree.add(cpio.file("etc/hostname", b"kvmkit-guest\n"))
    tree.mkdir("boot")
    return tree.entries


def build_iso(
    out: Path,
    kernel_version: str | None = None,
    *,
    progress: Progress | None = None,
) -> Path:
    """Build the installer ISO at ``out`` (replaced atomically); returns ``out``.

    ``kernel_version`` defaults to the cached guest kit's kernel, else apt's.  Needs apt
    (the kernel package), xorriso, isolinux, syslinux-common, extlinux, fdisk, e2fsprogs
    and busybox-static; a missing one is a GuestKitError naming its package."""
    total = len(ISO_STEPS)

    def step(index: int) -> None:
        if progress is not None:
            progress(ISO_STEPS[index], index, total)

    out = Path(out).absolute()
    if not out.parent.is_dir():
        raise GuestKitError(f"{out.parent} is not a directory")
    xorriso = shutil.which("xorriso")
    if xorriso is None:
        raise GuestKitError("xorriso is not installed", hint="`apt-get install xorriso`")
    isolinux = _require(*ISOLINUX_BIN)
    ldlinux = _require(*LDLINUX_C32)
    mbr = _require(*MBR_BIN)
    busybox = guestkit._busybox_path()
    tools = _host_tools()

    step(0)
    if kernel_version is None:
        kit = guestkit.find_kit()
        kernel_version = kit.kernel_version if kit else guestkit.apt_kernel_version()
    with tempfile.TemporaryDirectory(prefix="kvmkit-iso-") as tmp_str:
        tmp = Path(tmp_str)
        image, modules_dir = guestkit.fetch_kernel_package(
            kernel_version, tmp, on_download=lambda: step(1), on_unpack=lambda: step(2)
        )
        index = index_modules(modules_dir)

        step(3)
        boot_initrd = _base(busybox, BOOT_SCRIPT, load_order(BOOT_MODULES, index))
        rootfs = root_filesystem(busybox, kernel_version, tools)

        step(4)
        installer = _base(busybox, INSTALL_SCRIPT, load_order(INSTALL_MODULES, index))
        installer.extend(tools)
        if Path(MKE2FS_CONF).exists():
            installer.add(cpio.file("etc/mke2fs.conf", Path(MKE2FS_CONF).read_bytes()))
        payload = {
            "vmlinuz": image.read_bytes(),
            "initrd.gz": _gzip(boot_initrd.entries),
            "rootfs.cpio.gz": _gzip(rootfs),
            "mbr.bin": mbr.read_bytes(),
        }
        for name, data in payload.items():
            installer.add(cpio.file(f"payload/{name}", data))

        step(5)
        iso_root = tmp / "iso"
        (iso_root / "isolinux").mkdir(parents=True)
        (iso_root / "boot").mkdir()
        shutil.copyfile(isolinux, iso_root / "isolinux" / "isolinux.bin")
        shutil.copyfile(ldlinux, iso_root / "isolinux" / "ldlinux.c32")
        shutil.copyfile(image, iso_root / "boot" / "vmlinuz")
        cpio.write_gzip(iso_root / "boot" / "install.gz", installer.entries)
        (iso_root / "isolinux" / "isolinux.cfg").write_text(
            "SERIAL 0 115200\nDEFAULT install\nPROMPT 0\nTIMEOUT 1\nLABEL install\n"
            "  LINUX /boot/vmlinuz\n  INITRD /boot/install.gz\n"
            "  APPEND console=ttyS0 rdinit=/init panic=-1 quiet\n"
        )
        partial = tmp / "out.iso"
        guestkit._run(
            [xorriso, "-as", "mkisofs", "-quiet", "-o", str(partial), "-V", "KVMKIT_INSTALL"]
            + ["-b", "isolinux/isolinux.bin", "-c", "isolinux/boot.cat", "-no-emul-boot"]
            + ["-boot-load-size", "4", "-boot-info-table", str(iso_root)],
            timeout=600,
        )
        shutil.move(str(partial), str(out))
    if progress is not None:
        progress("done", total, total)
    return out


def _gzip(entries: list[cpio.Entry]) -> bytes:
    return gzip.compress(cpio.pack(entries), compresslevel=6, mtime=0)


def scan_console(text: str) -> list[tuple[str, int, str]]:
    """The installer's reports in console ``text``, in order: ("step", n, what),
    ("done", N, "") or ("failed", 0, why)."""
    reports: list[tuple[str, int, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(STEP_MARKER + " "):
            number, _, what = line[len(STEP_MARKER) + 1 :].partition(" ")
            try:
                reports.append(("step", int(number.split("/")[0]), what))
            except ValueError:
                continue
        elif line == DONE_MARKER:
            reports.append(("done", INSTALL_STEPS, ""))
        elif line.startswith(FAILED_MARKER):
            reports.append(("failed", 0, line[len(FAILED_MARKER) :].lstrip(": ")))
    return reports


__all__ = ["build_iso", "scan_console", "DONE_MARKER", "FAILED_MARKER", "INSTALL_STEPS"]
