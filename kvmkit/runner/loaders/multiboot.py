"""Multiboot v1 images: find and check the header, load by the a.out-kludge addresses.

Follows the Multiboot 0.6.96 specification (section 3.1) and QEMU's
``hw/i386/multiboot.c``:

- the header is searched 4-byte aligned in the first 8 KiB; like QEMU, a magic is only
  taken at offsets below 8192 - 48, so the whole 48-byte header fits;
- flag bits 0-15 are requirements.  kvmkit meets bit 0 (page-aligned modules) and bit 1
  (memory information); bit 2 (video mode) is ignored, as QEMU does, and recorded in
  :attr:`MultibootHeader.wants_video`; any other bit in 0-15 is refused, as the
  specification asks of a loader that cannot meet it (QEMU silently ignores them, GRUB
  refuses them);
- without bit 16 the file must be an ELF32 for i386, loaded by its program headers (QEMU
  refuses an ELF64: "Cannot load x86-64 image, give a 32bit one");
- with bit 16 the header's ``header_addr``/``load_addr``/``load_end_addr``/
  ``bss_end_addr``/``entry_addr`` say what part of the file goes where, with QEMU's
  checks.
"""

from __future__ import annotations

import struct
from pathlib import Path

from kvmkit.runner.errors import ImageError
from kvmkit.runner.loaders.image import MultibootHeader, Segment

MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
#: The header must lie within the file's first 8 KiB.
MULTIBOOT_SEARCH = 8192
_HEADER_SIZE = 48

FLAG_PAGE_ALIGN = 1 << 0
FLAG_MEMORY_INFO = 1 << 1
FLAG_VIDEO_MODE = 1 << 2
FLAG_AOUT_KLUDGE = 1 << 16
#: Requirement bits (0-15) kvmkit knows; video is known but ignored.
_KNOWN_REQUIRED = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE
_U32 = 0xFFFFFFFF


def find_multiboot_header(path: Path, data: bytes) -> MultibootHeader | None:
    """The multiboot header of ``data``, or ``None`` when there is no magic.

    Raises :class:`ImageError` when a magic is found but no header has a valid checksum,
    when the header is cut short by the end of the file, or when it asks for a
    requirement kvmkit cannot meet.
    """
    limit = min(len(data), MULTIBOOT_SEARCH - _HEADER_SIZE)
    bad: tuple[int, int, int] | None = None
    for offset in range(0, limit, 4):
        if int.from_bytes(data[offset : offset + 4], "little") != MULTIBOOT_HEADER_MAGIC:
            continue
        if offset + 12 > len(data):
            raise ImageError(
                path,
                f"truncated multiboot header at offset {offset:#x}: the file ends before "
                "its flags and checksum",
            )
        flags, checksum = struct.unpack_from("<II", data, offset + 4)
        if (MULTIBOOT_HEADER_MAGIC + flags + checksum) & _U32 == 0:
            return _parse_header(path, data, offset, flags)
        if bad is None:
            bad = (offset, flags, checksum)
    if bad is not None:
        offset, flags, checksum = bad
        raise ImageError(
            path,
            f"multiboot header at offset {offset:#x} has a bad checksum: magic + flags "
            f"{flags:#x} + checksum {checksum:#x} = "
            f"{(MULTIBOOT_HEADER_MAGIC + flags + checksum) & _U32:#x}, must be 0",
        )
    return None


def _parse_header(path: Path, data: bytes, offset: int, flags: int) -> MultibootHeader:
    unsupported = flags & 0xFFFF & ~_KNOWN_REQUIRED
    if unsupported:
        raise ImageError(
            path,
            f"multiboot header requires flag bits {unsupported:#x} (flags {flags:#x}); "
            "kvmkit supports bits 0 (page-aligned modules), 1 (memory info) and ignores 2 "
            "(video mode)",
        )
    fields: tuple[int | None, ...] = (None,) * 5
    if flags & FLAG_AOUT_KLUDGE:
        if offset + 32 > len(data):
            raise ImageError(
                path,
                f"truncated multiboot header at offset {offset:#x}: flag bit 16 (a.out "
                "kludge) needs the address fields, but the file ends first",
            )
        fields = struct.unpack_from("<5I", data, offset + 12)
    header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr = fields
    return MultibootHeader(
        flags=flags,
        header_addr=header_addr,
        load_addr=load_addr,
        load_end_addr=load_end_addr,
        bss_end_addr=bss_end_addr,
        entry_addr=entry_addr,
        wants_mem_info=bool(flags & FLAG_MEMORY_INFO),
        wants_page_align=bool(flags & FLAG_PAGE_ALIGN),
        wants_video=bool(flags & FLAG_VIDEO_MODE),
        offset=offset,
    )


def load_aout_kludge(path: Path, data: bytes, header: MultibootHeader) -> tuple[Segment, int]:
    """The one segment and the entry point of an image with flag bit 16 set.

    The file from ``offset - (header_addr - load_addr)`` goes to ``load_addr``; it ends at
    ``load_end_addr`` (0: the end of the file); the memory up to ``bss_end_addr`` (0: no
    BSS) is zeroed.
    """
    assert header.header_addr is not None and header.load_addr is not None
    assert header.load_end_addr is not None and header.bss_end_addr is not None
    assert header.entry_addr is not None
    header_addr, load_addr = header.header_addr, header.load_addr
    load_end, bss_end = header.load_end_addr, header.bss_end_addr
    where = f"multiboot a.out kludge (header at offset {header.offset:#x})"
    if header_addr < load_addr:
        raise ImageError(
            path, f"{where}: header_addr {header_addr:#x} is below load_addr {load_addr:#x}"
        )
    if header_addr - load_addr > header.offset:
        raise ImageError(
            path,
            f"{where}: header_addr - load_addr = {header_addr - load_addr:#x} is larger than "
            f"the header's file offset {header.offset:#x}, so the image would start before "
            "the file",
        )
    text_offset = header.offset - (header_addr - load_addr)
    if load_end:
        if load_end < load_addr:
            raise ImageError(
                path, f"{where}: load_end_addr {load_end:#x} is below load_addr {load_addr:#x}"
            )
        load_size = load_end - load_addr
    else:
        load_size = len(data) - text_offset
    if text_offset + load_size > len(data):
        raise ImageError(
            path,
            f"{where}: file range {text_offset:#x}-{text_offset + load_size - 1:#x} "
            f"(load_addr {load_addr:#x} to load_end_addr {load_end:#x}) lies beyond the end "
            f"of the file ({len(data):#x} bytes): truncated?",
        )
    if load_addr + load_size > 1 << 32:
        raise ImageError(path, f"{where}: the image does not fit in the 32-bit address space")
    memsz = load_size
    if bss_end:
        if bss_end < load_addr + load_size:
            raise ImageError(
                path,
                f"{where}: bss_end_addr {bss_end:#x} is below the end of the loaded file "
                f"data {load_addr + load_size:#x}",
            )
        memsz = bss_end - load_addr
    return Segment(load_addr, data[text_offset : text_offset + load_size], memsz), header.entry_addr
