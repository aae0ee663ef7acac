"""Kernel image and module helpers for the guest kit: the PVH ELF inside a bzImage, and
module load order from each module's ``depends=`` field (Debian ships no ``modules.dep``
until depmod runs).  Pure Python, no host tools.
"""

from __future__ import annotations

import io
import lzma
import os
from collections.abc import Iterable
from pathlib import Path

from elftools.elf.elffile import ELFFile
from elftools.elf.segments import NoteSegment

from kvmkit.qemu.errors import GuestKitError

_XZ_MAGIC = b"\xfd7zXZ\x00"
_XEN_ELFNOTE_PHYS32_ENTRY = 18


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """Return the ELF ``vmlinux`` embedded XZ-compressed in ``bzimage``, or None when the
    image holds no XZ stream that decompresses to an ELF file."""
    start = 0
    while (offset := bzimage.find(_XZ_MAGIC, start)) >= 0:
        start = offset + 1
        try:
            out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[offset:])
        except lzma.LZMAError:
            continue
        if out[:4] == b"\x7fELF":
            return out
    return None


def has_pvh_entry(elf: bytes) -> bool:
    """True when the ELF kernel carries the Xen PVH entry note that QEMU's ``-kernel``
    needs to boot an ELF directly."""
    try:
        parsed = ELFFile(io.BytesIO(elf))
        for segment in parsed.iter_segments():
            if not isinstance(segment, NoteSegment):
                continue
            for note in segment.iter_notes():
                n_type: object = note["n_type"]  # pyelftools leaves Xen's note types as ints
                if note["n_name"] == "Xen" and n_type == _XEN_ELFNOTE_PHYS32_ENTRY:
                    return True
    except Exception:  # a corrupt image is simply not PVH-bootable
        return False
    return False


def _read_ko(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        data = lzma.decompress(data)
    elif path.name.endswith(".zst"):
        raise GuestKitError(
            f"{path} is zstd-compressed, which kvmkit cannot unpack",
            hint="name a kernel whose modules are plain or .xz",
        )
    return data


def module_name(path: Path) -> str:
    """The kernel's name for the module file at ``path`` (dashes become underscores)."""
    name = path.name
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


def index_modules(modules_dir: Path) -> dict[str, Path]:
    """Map module name → file for every ``.ko`` (optionally ``.xz``) under ``modules_dir``."""
    found: dict[str, Path] = {}
    for root, _dirs, files in os.walk(modules_dir):
        for fname in files:
            if ".ko" in fname:
                path = Path(root) / fname
                found[module_name(path)] = path
    return found


def module_depends(data: bytes) -> list[str]:
    """The ``depends=`` list from a module's ``.modinfo`` section."""
    elf = ELFFile(io.BytesIO(data))
    section = elf.get_section_by_name(".modinfo")
    if section is None:
        return []
    for field in section.data().split(b"\0"):
        if field.startswith(b"depends="):
            value = field[len(b"depends=") :].decode()
            return [d.replace("-", "_") for d in value.split(",") if d]
    return []


def load_order(wanted: Iterable[str], index: dict[str, Path]) -> list[tuple[str, bytes]]:
    """The modules in ``wanted`` plus everything they depend on, dependencies first, as
    (name, uncompressed .ko bytes).  Raises GuestKitError for a module not in ``index``."""
    order: list[tuple[str, bytes]] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            raise GuestKitError(f"module dependency cycle through {name}")
        if name not in index:
            raise GuestKitError(
                f"kernel module {name} not found in the kernel's module tree",
                hint="it may be built in (then drop it) or the kernel lacks it",
            )
        visiting.add(name)
        data = _read_ko(index[name])
        for dep in module_depends(data):
            visit(dep)
        visiting.discard(name)
        done.add(name)
        order.append((name, data))

    for name in wanted:
        visit(name.replace("-", "_"))
    return order
