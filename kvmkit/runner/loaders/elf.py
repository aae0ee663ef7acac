"""ELF32 / ELF64 x86 executables: ``PT_LOAD`` segments by physical address, entry point.

The ELF header and the program headers are read by hand (``struct``), so a truncated or
foreign file gets a precise message and a run does not pay for importing pyelftools
(~25 ms).  Only an image whose program-header count overflows into section header 0
(``e_phnum == PN_XNUM``) is read with pyelftools, imported then; its exceptions become
:class:`ImageError`.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmkit.runner.errors import ImageError
from kvmkit.runner.loaders.image import Segment

ELF_MAGIC = b"\x7fELF"
EM_386 = 3
EM_X86_64 = 62
_ET_NAMES = {0: "ET_NONE", 1: "ET_REL (an object file: link it)", 4: "ET_CORE (a core dump)"}
_PF_X = 1
_PT_NAMES = {1: "PT_LOAD", 3: "PT_INTERP"}
_PN_XNUM = 0xFFFF
#: Header size and program-header entry size per ELF class (1: ELF32, 2: ELF64).
_LAYOUT = {1: ("<HHIIIIIHHHHHH", 52, 32), 2: ("<HHIQQQIHHHHHH", 64, 56)}
#: A program header per ELF class, and the order of its fields.
_PHDR = {
    1: ("<IIIIIIII", ("p_type", "p_offset", "p_vaddr", "p_paddr", "p_filesz", "p_memsz",
                      "p_flags", "p_align")),
    2: ("<IIQQQQQQ", ("p_type", "p_flags", "p_offset", "p_vaddr", "p_paddr", "p_filesz",
                      "p_memsz", "p_align")),
}  # fmt: skip
_MACHINE = {1: (EM_386, "i386"), 2: (EM_X86_64, "x86-64")}
_MACHINE_NAMES = {0: "none", 3: "i386", 8: "MIPS", 20: "PowerPC", 40: "ARM", 62: "x86-64",
                  183: "AArch64", 243: "RISC-V"}  # fmt: skip


@dataclass(frozen=True)
class ElfImage:
    """The loadable content of an ELF file."""

    elf_class: int  # 32 or 64
    entry: int
    segments: tuple[Segment, ...]


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def elf_class_of(data: bytes) -> int | None:
    """32 or 64 from ``EI_CLASS``, or ``None`` when the byte is missing or invalid."""
    if len(data) < 5 or data[4] not in (1, 2):
        return None
    return 32 if data[4] == 1 else 64


def _check_header(path: Path, data: bytes) -> tuple[int, int, int, int, int]:
    """Validate the ELF header; return ``(class_byte, e_entry, e_phoff, e_phentsize,
    e_phnum)``."""
    if len(data) < 16:
        raise ImageError(path, f"truncated ELF header: the file has only {len(data)} bytes")
    ei_class, ei_data, ei_version = data[4], data[5], data[6]
    if ei_class not in _LAYOUT:
        raise ImageError(path, f"bad ELF class {ei_class} in e_ident (expected 1 or 2)")
    if ei_data != 1:
        what = "big-endian" if ei_data == 2 else f"unknown data encoding {ei_data}"
        raise ImageError(path, f"{what} ELF; x86 guests are little-endian")
    if ei_version != 1:
        raise ImageError(path, f"bad ELF version {ei_version} in e_ident (expected 1)")
    fmt, ehsize, phentsize = _LAYOUT[ei_class]
    bits = 32 if ei_class == 1 else 64
    if len(data) < ehsize:
        raise ImageError(
            path, f"truncated ELF{bits} header: {len(data)} bytes, the header needs {ehsize}"
        )
    (e_type, e_machine, _version, e_entry, e_phoff, _shoff, _flags, _ehsize,
     e_phentsize, e_phnum, *_rest) = struct.unpack_from(fmt, data, 16)  # fmt: skip
    if e_type not in (2, 3):  # ET_EXEC, ET_DYN (loaded at its addresses, not relocated)
        kind = _ET_NAMES.get(e_type, f"type {e_type}")
        raise ImageError(path, f"ELF file is {kind}, not an executable")
    want_machine, want_name = _MACHINE[ei_class]
    if e_machine != want_machine:
        name = _MACHINE_NAMES.get(e_machine, "unknown")
        raise ImageError(
            path,
            f"unsupported machine {e_machine} ({name}) for ELF{bits}; kvmkit runs ELF{bits} "
            f"images for {want_name} only",
        )
    if e_phnum and e_phentsize != phentsize:
        raise ImageError(
            path, f"bad program header entry size {e_phentsize} (ELF{bits} uses {phentsize})"
        )
    return ei_class, e_entry, e_phoff, e_phentsize, e_phnum


def _program_headers(
    path: Path, data: bytes, ei_class: int, phoff: int, phentsize: int, phnum: int
) -> list[dict[str, Any]]:
    """The program headers as dicts of their fields (``p_type`` as a name for PT_LOAD and
    PT_INTERP, else the number)."""
    bits = 32 if ei_class == 1 else 64
    if phnum == _PN_XNUM:
        return _program_headers_xnum(path, data, bits)
    table_end = phoff + phnum * phentsize
    if phnum and table_end > len(data):
        raise ImageError(
            path,
            f"program headers {phoff:#x}-{table_end - 1:#x} lie beyond the end of the "
            f"file ({len(data):#x} bytes): truncated?",
        )
    fmt, names = _PHDR[ei_class]
    headers = []
    for i in range(phnum):
        ph = dict(zip(names, struct.unpack_from(fmt, data, phoff + i * phentsize), strict=True))
        ph["p_type"] = _PT_NAMES.get(ph["p_type"], ph["p_type"])
        headers.append(ph)
    return headers


def _program_headers_xnum(path: Path, data: bytes, bits: int) -> list[dict[str, Any]]:
    """PN_XNUM: the count lives in section header 0; pyelftools reads that rare case."""
    from elftools.common.exceptions import ELFError
    from elftools.construct.core import ConstructError
    from elftools.elf.elffile import ELFFile

    try:
        elf = ELFFile(io.BytesIO(data))
        phnum = elf.num_segments()
        headers = [dict(elf.get_segment(i).header) for i in range(phnum)]
    except (ELFError, ConstructError, struct.error, ValueError) as exc:
        raise ImageError(path, f"malformed ELF{bits} program headers: {exc}") from exc
    return headers


def load_elf(path: Path, data: bytes) -> ElfImage:
    """Read an ELF32 (i386) or ELF64 (x86-64) executable held in ``data``.

    Segments are placed at ``p_paddr``.  As in QEMU's ``load_elf``, an entry point given
    as a virtual address inside an executable segment whose ``p_vaddr`` differs from its
    ``p_paddr`` is translated to the physical address.  Layout checks against guest RAM
    are the caller's (:func:`check_layout`).
    """
    ei_class, e_entry, phoff, phentsize, phnum = _check_header(path, data)
    entry = e_entry
    bits = 32 if ei_class == 1 else 64
    headers = _program_headers(path, data, ei_class, phoff, phentsize, phnum)
    segments = []
    for index, ph in enumerate(headers):
        p_type = ph["p_type"]
        if p_type == "PT_INTERP":
            raise ImageError(path, "dynamically linked (has PT_INTERP); link it with -static")
        if p_type != "PT_LOAD" or ph["p_memsz"] == 0:
            continue  # QEMU, too, skips empty PT_LOADs
        offset, filesz, memsz = ph["p_offset"], ph["p_filesz"], ph["p_memsz"]
        if filesz > memsz:
            raise ImageError(
                path,
                f"program header {index}: p_filesz {filesz:#x} is larger than p_memsz {memsz:#x}",
            )
        if offset + filesz > len(data):
            raise ImageError(
                path,
                f"program header {index}: file range {offset:#x}-{offset + filesz - 1:#x} lies "
                f"beyond the end of the file ({len(data):#x} bytes): truncated?",
            )
        paddr, vaddr = ph["p_paddr"], ph["p_vaddr"]
        if paddr != vaddr and ph["p_flags"] & _PF_X and vaddr <= e_entry < vaddr + filesz:
            entry = e_entry - vaddr + paddr
        segments.append(Segment(paddr, data[offset : offset + filesz], memsz))
    return ElfImage(bits, entry, tuple(segments))
