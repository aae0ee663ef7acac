"""The multiboot v1 information block, laid out the way QEMU 7.2's ``-kernel`` lays it out.

QEMU (``hw/i386/multiboot.c`` and its option ROM) gives the kernel::

    0x9000             e820 memory map (24-byte entries: size=20, base, length, type)
    0x9500             multiboot_info (88 bytes); EBX points here
    A = load_addr + page_align(kernel size)   (right after the image)
    A                  module table: 16 bytes per module (mod_start, mod_end, string, 0)
    then               strings: each module's string, the command line, the loader name
    page_align(...)    the modules, one after the other, each starting on a page

When the image itself covers 0x9000-0x9557 (a kernel linked at 0x8000, say), the map and
the info block move to the end of the string area instead, so that neither overwrites
the other: QEMU would write them over the kernel.  ``mod_end`` is exclusive, as in QEMU.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvmkit.errors import GuestMemoryAccessError
from kvmkit.kvm import Vm
from kvmkit.runner.errors import ImageError
from kvmkit.runner.loaders.image import LoadedImage
from kvmkit.runner.loaders.layout import (
    MEM_LOWER_KIB,
    PAGE,
    e820_map,
    mem_upper_kib,
    pc_ram_layout,
)
from kvmkit.runner.loaders.load import read_regular_file, write_guest
from kvmkit.runner.loaders.multiboot import MULTIBOOT_BOOTLOADER_MAGIC

__all__ = [
    "Module",
    "MultibootPlan",
    "plan_multiboot_info",
    "build_multiboot_info",
    "MULTIBOOT_BOOTLOADER_MAGIC",
    "MBI_FLAGS",
    "BOOTLOADER_NAME",
]

INFO_MEMORY = 1 << 0
INFO_BOOT_DEVICE = 1 << 1
INFO_CMDLINE = 1 << 2
INFO_MODS = 1 << 3
INFO_MMAP = 1 << 6
INFO_BOOTLOADER_NAME = 1 << 9
MBI_FLAGS = (
    INFO_MEMORY | INFO_BOOT_DEVICE | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_BOOTLOADER_NAME
)
#: QEMU's: BIOS drive 0x80, no partition.
BOOT_DEVICE = 0x8000FFFF
BOOTLOADER_NAME = "kvmkit"

MBI_SIZE = 88
MMAP_ENTRY_SIZE = 24
MOD_ENTRY_SIZE = 16
#: QEMU's ADDR_E820_MAP and ADDR_MBI.
MMAP_ADDR = 0x9000
INFO_ADDR = 0x9500
#: Multiboot addresses are 32-bit.
_4G = 1 << 32


@dataclass(frozen=True)
class Module:
    """A multiboot module: the file to load and the string the kernel gets with it."""

    path: Path
    cmdline: str


@dataclass
class MultibootPlan:
    """Where everything goes (computed, nothing written yet); :meth:`write` writes it."""

    info_addr: int
    #: Half-open guest-physical ranges the block, its strings and the modules occupy.
    ranges: list[tuple[int, int]]
    _writes: list[tuple[int, bytes]] = field(default_factory=list, repr=False)
    _owner: Path = field(default=Path(), repr=False)

    def write(self, vm: Vm) -> int:
        """Write the modules and the block into ``vm``; return EBX for the kernel."""
        try:
            for addr, data in self._writes:
                write_guest(vm, addr, data)
        except GuestMemoryAccessError as exc:
            raise ImageError(
                self._owner, f"guest memory does not cover the multiboot information: {exc}"
            ) from exc
        return self.info_addr


def _align(value: int, to: int) -> int:
    return (value + to - 1) & ~(to - 1)


def _c_string(owner: Path, what: str, text: str) -> bytes:
    raw = text.encode()
    if b"\0" in raw:
        raise ImageError(owner, f"{what} contains a NUL byte; multiboot strings cannot")
    return raw + b"\0"


def _overlaps(start: int, end: int, ranges: Sequence[tuple[int, int]]) -> bool:
    return any(start < e and s < end for s, e in ranges)


def _place_modules(
    modules: Sequence[Module], contents: Sequence[bytes], at: int, low_ram: int
) -> list[tuple[int, bytes]]:
    """``(address, contents)`` of each module, page-aligned from ``at``, all below
    ``low_ram``."""
    placed = []
    for module, data in zip(modules, contents, strict=True):
        end = at + len(data)
        if end > low_ram:
            raise ImageError(
                module.path,
                f"module ({len(data):#x} bytes) at {at:#x}-{end - 1:#x} does not fit in the "
                f"guest's {low_ram:#x} bytes of RAM below 4 GiB; give the guest more memory",
            )
        placed.append((at, data))
        at = _align(end, PAGE)
    return placed


def plan_multiboot_info(
    image: LoadedImage,
    *,
    ram_size: int,
    cmdline: str,
    modules: Sequence[Module] = (),
    e820: Sequence[tuple[int, int, int]] | None = None,
) -> MultibootPlan:
    """Read ``modules`` and lay out the block for ``image`` in a ``pc`` guest of
    ``ram_size`` bytes (RAM split as :func:`~kvmkit.runner.loaders.layout.pc_ram_layout`).

    ``cmdline`` is used exactly as given (QEMU passes ``"<image-name> <append>"``);
    ``e820`` defaults to :func:`~kvmkit.runner.loaders.layout.e820_map` of ``ram_size``.
    Raises :class:`ImageError` when a module cannot be read or something does not fit in
    the RAM below 4 GiB (naming the module when it is one).
    """
    segments = [s for s in image.segments if s.memsz]
    low_ram = min(pc_ram_layout(ram_size).below_4g, _4G)
    mmap = list(e820 if e820 is not None else e820_map(ram_size))
    image_ranges = [(s.addr, s.end) for s in segments]
    load_addr = min(s.addr for s in segments)
    area = load_addr + _align(image.end - load_addr, PAGE)

    # ---- strings and module table, right after the image ----------------------------
    table_at = area
    strings_at = table_at + MOD_ENTRY_SIZE * len(modules)
    strings = bytearray()

    def add_string(raw: bytes) -> int:
        addr = strings_at + len(strings)
        strings.extend(raw)
        return addr

    mod_strings = [add_string(_c_string(m.path, "the module string", m.cmdline)) for m in modules]
    cmdline_addr = add_string(_c_string(image.path, "the command line", cmdline))
    name_addr = add_string(_c_string(image.path, "the boot loader name", BOOTLOADER_NAME))
    area_end = strings_at + len(strings)
    mmap_bytes = b"".join(
        struct.pack("<IQQI", MMAP_ENTRY_SIZE - 4, base, length, kind) for base, length, kind in mmap
    )
    contents: list[bytes] = []
    for module in modules:  # at most the RAM below 4 GiB, all modules together
        budget = low_ram - sum(len(c) for c in contents)
        contents.append(read_regular_file(module.path, limit=max(budget, 0), what="module"))
    low_block = (MMAP_ADDR, INFO_ADDR + MBI_SIZE)
    fits_low = len(mmap_bytes) <= INFO_ADDR - MMAP_ADDR
    for appended in (False, True):
        if appended or not fits_low or _overlaps(*low_block, image_ranges):
            appended = True
            mmap_addr = _align(area_end, 8)
            info_addr = mmap_addr + len(mmap_bytes)
            block_end = info_addr + MBI_SIZE
        else:
            mmap_addr, info_addr, block_end = MMAP_ADDR, INFO_ADDR, area_end
        placed = _place_modules(modules, contents, _align(block_end, PAGE), low_ram)
        ranges = [(area, block_end)] + [
            (start, max(start + len(d), start + 1)) for start, d in placed
        ]
        if appended or not _overlaps(*low_block, ranges):
            break
    if not appended:
        ranges.append(low_block)
    if block_end > low_ram:
        raise ImageError(
            image.path,
            f"the multiboot information ({block_end - area:#x} bytes at {area:#x}, after the "
            f"image) does not fit in the guest's {low_ram:#x} bytes of RAM below 4 GiB; give "
            "the guest more memory",
        )
    table = b"".join(
        struct.pack("<4I", start, start + len(data), string_addr, 0)
        for (start, data), string_addr in zip(placed, mod_strings, strict=True)
    )
    writes = [(start, data) for start, data in placed]

    info = bytearray(MBI_SIZE)
    struct.pack_into("<4I", info, 0, MBI_FLAGS, MEM_LOWER_KIB, mem_upper_kib(mmap), BOOT_DEVICE)
    struct.pack_into("<III", info, 16, cmdline_addr, len(modules), table_at)
    struct.pack_into("<II", info, 44, len(mmap_bytes), mmap_addr)
    struct.pack_into("<I", info, 64, name_addr)
    writes += [
        (table_at, bytes(table) + bytes(strings)),
        (mmap_addr, mmap_bytes),
        (info_addr, bytes(info)),
    ]
    return MultibootPlan(info_addr, ranges, writes, image.path)


def build_multiboot_info(
    vm: Vm,
    image: LoadedImage,
    *,
    ram_size: int,
    cmdline: str,
    modules: Sequence[Module] = (),
    e820: Sequence[tuple[int, int, int]] | None = None,
) -> int:
    """Plan (:func:`plan_multiboot_info`) and write the block into ``vm``; return its
    address (what EBX gets; EAX gets :data:`MULTIBOOT_BOOTLOADER_MAGIC`).  The caller
    guarantees ``vm`` maps the RAM below 4 GiB; nothing is written unless all fits."""
    plan = plan_multiboot_info(
        image, ram_size=ram_size, cmdline=cmdline, modules=modules, e820=e820
    )
    return plan.write(vm)
