"""The multiboot v1 information block, written the way QEMU's ``-kernel`` writes it.

Layout, from ``info_addr`` (default 0x9000, QEMU's ``MULTIBOOT_STRUCT_ADDR``) up, all
below 0x10000::

    info_addr          multiboot_info (88 bytes)
    + 88               memory map: 4 entries of 24 bytes (size=20, base, length, type)
    + 88 + 96          module table: 16 bytes per module (mod_start, mod_end, string, 0)
    then               strings: the command line, "kvmkit", each module's string

Modules go page-aligned after ``max(image.end, 1 MiB)`` (or from ``modules_addr``), one
after the other, each starting on a page; ``mod_end`` is exclusive, as in QEMU.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmkit.errors import GuestMemoryAccessError
from kvmkit.kvm import Vm
from kvmkit.runner.errors import ImageError, RunnerError
from kvmkit.runner.loaders.image import LoadedImage
from kvmkit.runner.loaders.load import write_guest
from kvmkit.runner.loaders.multiboot import MULTIBOOT_BOOTLOADER_MAGIC

__all__ = [
    "Module",
    "build_multiboot_info",
    "MULTIBOOT_BOOTLOADER_MAGIC",
    "MBI_FLAGS",
    "BOOTLOADER_NAME",
]

INFO_MEMORY = 1 << 0
INFO_CMDLINE = 1 << 2
INFO_MODS = 1 << 3
INFO_MMAP = 1 << 6
INFO_BOOTLOADER_NAME = 1 << 9
MBI_FLAGS = INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_BOOTLOADER_NAME
BOOTLOADER_NAME = "kvmkit"

MBI_SIZE = 88
MMAP_ENTRY_SIZE = 24
MOD_ENTRY_SIZE = 16
MEMORY_AVAILABLE = 1
MEMORY_RESERVED = 2
#: The block must be reachable by 16-bit code, like QEMU's (everything below 64 KiB).
INFO_LIMIT = 0x10000
PAGE = 0x1000
ONE_MIB = 0x100000
#: mem_upper counts memory up to the PCI hole, as a PC BIOS reports it.
_BELOW_4G_RAM = 0xC0000000


@dataclass(frozen=True)
class Module:
    """A multiboot module: the file to load and the string the kernel gets with it."""

    path: Path
    cmdline: str


def _align(value: int, to: int) -> int:
    return (value + to - 1) & ~(to - 1)


def _c_string(owner: Path, what: str, text: str) -> bytes:
    raw = text.encode()
    if b"\0" in raw:
        raise ImageError(owner, f"{what} contains a NUL byte; multiboot strings cannot")
    return raw + b"\0"


def memory_map(ram_size: int) -> list[tuple[int, int, int]]:
    """``(base, length, type)`` entries: the e820 map of a PC with ``ram_size`` bytes of RAM
    at 0, as SeaBIOS reports it below 1 MiB."""
    entries = [
        (0, 0x9FC00, MEMORY_AVAILABLE),
        (0x9FC00, 0x400, MEMORY_RESERVED),  # extended BIOS data area
        (0xF0000, 0x10000, MEMORY_RESERVED),  # BIOS ROM
    ]
    if ram_size > ONE_MIB:
        entries.append((ONE_MIB, ram_size - ONE_MIB, MEMORY_AVAILABLE))
    return entries


def _overlap(a_start: int, a_end: int, b_start: int, b_end: int) -> bool:
    return a_start < b_end and b_start < a_end


def build_multiboot_info(
    vm: Vm,
    image: LoadedImage,
    *,
    ram_size: int,
    cmdline: str,
    modules: Sequence[Module] = (),
    info_addr: int = 0x9000,
    modules_addr: int | None = None,
) -> int:
    """Load ``modules`` and write the multiboot information block into ``vm``; return its
    address (what EBX gets; EAX gets :data:`MULTIBOOT_BOOTLOADER_MAGIC`).

    ``cmdline`` is written exactly as given (QEMU passes ``"<image-name> <append>"``).
    Modules start at ``modules_addr`` (default: after ``max(image.end, 1 MiB)``), rounded
    up to a page, each on its own page.
    The caller guarantees ``vm`` maps ``[0, ram_size)`` and has the image placed already
    or places it afterwards; nothing is written unless everything fits.  Raises
    :class:`ImageError` when the block does not fit in ``[info_addr, 0x10000)``, overlaps
    the image, or a module cannot be read or does not fit in guest RAM (naming the module).
    """
    if info_addr % 8 or info_addr < 0:
        raise RunnerError(f"info_addr {info_addr:#x} must be a non-negative multiple of 8")
    if ram_size < ONE_MIB:
        raise ImageError(
            image.path,
            f"a multiboot boot needs at least 1 MiB of guest RAM, the guest has {ram_size:#x}",
        )
    # ---- modules: read them and choose their addresses ---------------------------------
    mod_data: list[tuple[Module, bytes]] = []
    for module in modules:
        try:
            mod_data.append((module, Path(module.path).read_bytes()))
        except OSError as exc:
            raise ImageError(module.path, f"cannot read module: {exc.strerror or exc}") from exc
    ram_limit = min(ram_size, 1 << 32)  # mod_start and mod_end are 32-bit
    next_addr = _align(modules_addr if modules_addr is not None else max(image.end, ONE_MIB), PAGE)
    # (module, contents, start, end) with end exclusive
    placed: list[tuple[Module, bytes, int, int]] = []
    for module, data in mod_data:
        start, end = next_addr, next_addr + len(data)
        if end > ram_limit:
            raise ImageError(
                module.path,
                f"module ({len(data):#x} bytes) at {start:#x}-{end - 1:#x} does not fit in "
                f"guest RAM ({ram_size:#x} bytes{', 4 GiB usable' if ram_size > ram_limit else ''}"
                "); give the guest more memory",
            )
        for seg in image.segments:
            if seg.memsz and _overlap(start, max(end, start + 1), seg.addr, seg.end):
                raise ImageError(
                    module.path,
                    f"module at {start:#x}-{end - 1:#x} overlaps image segment {seg.describe()}",
                )
        placed.append((module, data, start, end))
        next_addr = _align(end, PAGE)

    # ---- the block: info, memory map, module table, strings ----------------------------
    mmap = memory_map(ram_size)
    mmap_addr = info_addr + MBI_SIZE
    mods_table = mmap_addr + MMAP_ENTRY_SIZE * len(mmap)
    strings_at = mods_table + MOD_ENTRY_SIZE * len(modules)
    strings = bytearray()

    def add_string(raw: bytes) -> int:
        addr = strings_at + len(strings)
        strings.extend(raw)
        return addr

    cmdline_addr = add_string(_c_string(image.path, "the command line", cmdline))
    name_addr = add_string(_c_string(image.path, "the boot loader name", BOOTLOADER_NAME))
    table = bytearray()
    for module, _data, start, end in placed:
        string_addr = add_string(_c_string(module.path, "the module string", module.cmdline))
        table += struct.pack("<4I", start, end, string_addr, 0)
    block_end = strings_at + len(strings)
    if block_end > INFO_LIMIT:
        raise ImageError(
            image.path,
            f"the multiboot information block needs {block_end - info_addr:#x} bytes from "
            f"{info_addr:#x}, but only {max(INFO_LIMIT - info_addr, 0):#x} fit below "
            f"{INFO_LIMIT:#x}: shorten the command line or module strings, or use fewer modules",
        )
    for seg in image.segments:
        if seg.memsz and _overlap(info_addr, block_end, seg.addr, seg.end):
            raise ImageError(
                image.path,
                f"the multiboot information block {info_addr:#x}-{block_end - 1:#x} overlaps "
                f"image segment {seg.describe()}; choose another info_addr",
            )
    for module, _data, start, end in placed:
        if _overlap(info_addr, block_end, start, max(end, start + 1)):
            raise ImageError(
                module.path,
                f"module at {start:#x}-{end - 1:#x} overlaps the multiboot information block "
                f"{info_addr:#x}-{block_end - 1:#x}",
            )

    info = bytearray(MBI_SIZE)
    mem_upper = (min(ram_size, _BELOW_4G_RAM) - ONE_MIB) // 1024
    struct.pack_into("<III", info, 0, MBI_FLAGS, 640, mem_upper)
    struct.pack_into("<III", info, 16, cmdline_addr, len(modules), mods_table)
    struct.pack_into("<II", info, 44, MMAP_ENTRY_SIZE * len(mmap), mmap_addr)
    struct.pack_into("<I", info, 64, name_addr)
    mmap_bytes = b"".join(
        struct.pack("<IQQI", MMAP_ENTRY_SIZE - 4, base, length, kind) for base, length, kind in mmap
    )
    try:
        for _module, data, start, _end in placed:
            write_guest(vm, start, data)
        write_guest(vm, info_addr, bytes(info) + mmap_bytes + bytes(table) + bytes(strings))
    except GuestMemoryAccessError as exc:
        raise ImageError(
            image.path, f"guest memory does not cover the multiboot information: {exc}"
        ) from exc
    return info_addr
