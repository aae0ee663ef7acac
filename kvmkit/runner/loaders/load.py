"""Detect an image's kind, load it, and place it in a VM."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from kvmkit.errors import GuestMemoryAccessError
from kvmkit.kvm import Vm
from kvmkit.kvm.modes import Mode
from kvmkit.runner.errors import ImageError, RunnerError
from kvmkit.runner.loaders.elf import elf_class_of, is_elf, load_elf
from kvmkit.runner.loaders.image import LoadedImage, Segment, check_layout, check_reserved
from kvmkit.runner.loaders.multiboot import (
    FLAG_AOUT_KLUDGE,
    find_multiboot_header,
    load_aout_kludge,
)

#: A real-mode image starts at CS:IP below 1 MiB: CS:IP = 0:entry below 64 KiB, else
#: CS = entry >> 4 (so the entry must then be on a 16-byte boundary).
REAL_MODE_LIMIT = 0x100000
_READ_CHUNK = 1 << 20
_FILE_KINDS = {
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
    stat.S_IFDIR: "directory",
}


def read_regular_file(path: str | os.PathLike[str], *, limit: int, what: str = "image") -> bytes:
    """The contents of the regular file ``path``, at most ``limit`` bytes.

    Never blocks and never reads without bound: the file is opened non-blocking, must be
    a regular file (a FIFO, a device, a directory or a socket is an :class:`ImageError`),
    and its size is checked against ``limit`` before anything is read.  An empty file,
    a missing one, or one larger than ``limit`` is an :class:`ImageError` naming it.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(path, f"cannot read {what}: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        kind = stat.S_IFMT(info.st_mode)
        if kind != stat.S_IFREG:
            name = _FILE_KINDS.get(kind, "special file")
            article = "an" if name[0] in "aeiou" else "a"
            raise ImageError(
                path, f"is {article} {name}, not a regular file; the {what} must be one"
            )
        if info.st_size > limit:
            raise ImageError(
                path,
                f"{what} is {info.st_size:#x} bytes, more than the {limit:#x} bytes of guest "
                "RAM it could go to; give the guest more memory",
            )
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(_READ_CHUNK, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise ImageError(path, f"cannot read {what}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if total > limit:  # the file grew while it was read
        raise ImageError(path, f"{what} grew beyond {limit:#x} bytes while it was read")
    if not total:
        raise ImageError(path, "file is empty")
    return b"".join(chunks)


def load_image(
    path: str | os.PathLike[str],
    *,
    ram_size: int,
    load_addr: int | None = None,
    flat_mode: Mode = Mode.LONG,
    reserved: Sequence[tuple[int, int]] = (),
) -> LoadedImage:
    """Read and validate a guest image; nothing is written anywhere yet (see :func:`place`).

    The kind is detected in this order: a multiboot v1 header (loaded by the a.out-kludge
    addresses when flag bit 16 is set, else as an ELF32 by its program headers), an ELF32
    (i386) or ELF64 (x86-64) executable, else a flat binary, which needs ``load_addr`` and
    starts there in ``flat_mode``.  ``load_addr`` and ``flat_mode`` are ignored for the
    other kinds: they say where they go and how they start.

    ``reserved`` holds half-open ``(start, end)`` guest-physical ranges the caller keeps
    for itself (page tables, GDT, stacks); no segment may touch them.  Every fault of the
    file, and every segment outside ``[0, ram_size)``, raises :class:`ImageError`.
    """
    path = Path(path)
    ranges = check_reserved(reserved)
    if ram_size <= 0:
        raise RunnerError(f"ram_size must be positive, got {ram_size}")
    data = read_regular_file(path, limit=ram_size)
    header = find_multiboot_header(path, data)
    if header is not None:
        if header.flags & FLAG_AOUT_KLUDGE:
            segment, entry = load_aout_kludge(path, data, header)
            segments: tuple[Segment, ...] = (segment,)
        else:
            if not is_elf(data):
                raise ImageError(
                    path,
                    f"multiboot header (flags {header.flags:#x}) without the a.out kludge "
                    "(flag bit 16) needs an ELF file, and this is not one",
                )
            if elf_class_of(data) == 64:
                raise ImageError(
                    path,
                    "multiboot ELF64 images are not loadable without the a.out kludge (flag "
                    "bit 16); give an ELF32 (objcopy -O elf32-i386), as QEMU asks too",
                )
            elf = load_elf(path, data)
            entry, segments = elf.entry, elf.segments
        image = LoadedImage(path, "multiboot", entry, Mode.PROTECTED, segments, header)
    elif is_elf(data):
        elf = load_elf(path, data)
        mode = Mode.LONG if elf.elf_class == 64 else Mode.PROTECTED
        image = LoadedImage(path, f"elf{elf.elf_class}", elf.entry, mode, elf.segments)
    else:
        if load_addr is None:
            raise ImageError(
                path,
                f"not an ELF file (bad magic {data[:4].hex()}) and no multiboot header; a flat "
                "binary needs a load address",
            )
        if flat_mode is Mode.REAL:
            _check_real_mode(path, load_addr, len(data))
        segments = (Segment(load_addr, data, len(data)),)
        image = LoadedImage(path, "flat", load_addr, flat_mode, segments)
    check_layout(path, image.segments, image.entry, ram_size=ram_size, reserved=ranges)
    return image


def _check_real_mode(path: Path, load_addr: int, size: int) -> None:
    if load_addr < 0 or load_addr + size > REAL_MODE_LIMIT:
        raise ImageError(
            path,
            f"a real-mode flat image must lie below {REAL_MODE_LIMIT:#x} (1 MiB), but "
            f"{size:#x} bytes at {load_addr:#x} end at {load_addr + size:#x}",
        )
    if load_addr > 0xFFFF and load_addr % 16:
        raise ImageError(
            path,
            f"a real-mode image at {load_addr:#x} (above 64 KiB) starts at CS:IP = "
            f"{load_addr >> 4:#x}:0, so its load address must be a multiple of 16",
        )


def write_guest(vm: Vm, addr: int, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` at guest-physical ``addr``, across memory regions if need be."""
    view = memoryview(data)
    while view:
        region = vm.region_for(addr)
        count = min(len(view), region.end - addr)
        region.write(addr, view[:count])
        addr += count
        view = view[count:]


_ZEROS = bytes(1 << 20)


def zero_guest(vm: Vm, addr: int, length: int) -> None:
    """Zero ``length`` bytes of guest memory at ``addr``."""
    while length > 0:
        count = min(length, len(_ZEROS))
        write_guest(vm, addr, memoryview(_ZEROS)[:count])
        addr += count
        length -= count


def place(image: LoadedImage, vm: Vm) -> None:
    """Write every segment of ``image`` into ``vm`` and zero its BSS.

    The caller guarantees the VM's memory covers the ``ram_size`` the image was loaded
    for; a segment that meets unmapped guest memory raises :class:`ImageError`.
    """
    for seg in image.segments:
        try:
            write_guest(vm, seg.addr, seg.data)
            zero_guest(vm, seg.addr + len(seg.data), seg.memsz - len(seg.data))
        except GuestMemoryAccessError as exc:
            raise ImageError(
                image.path, f"segment {seg.describe()} does not fit the VM's memory: {exc}"
            ) from exc
