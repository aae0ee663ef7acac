"""Guest-image loaders: flat, ELF32, ELF64 and multiboot images built in tmp dirs, their
segments and entry points, BSS zeroing in a real VM, the multiboot information block read
back from guest memory, and one ImageError per fault."""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmkit.kvm import Hlt, IoOut, Kvm, Vm
from kvmkit.kvm.modes import Mode, setup_protected_mode
from kvmkit.runner.errors import ImageError, RunnerError
from kvmkit.runner.loaders import (
    MULTIBOOT_BOOTLOADER_MAGIC,
    LoadedImage,
    Module,
    Segment,
    build_multiboot_info,
    load_image,
    place,
)
from kvmkit.runner.machine import RunResult

MiB = 1 << 20
RAM = 4 * MiB
PT_LOAD, PT_INTERP, PT_NOTE = 1, 3, 4
EM_386, EM_X86_64, EM_AARCH64 = 3, 62, 183
MB_MAGIC = 0x1BADB002


# ---- image builders ---------------------------------------------------------------------
@dataclass
class Ph:
    """One program header; ``data`` is laid out in the file by :func:`make_elf`."""

    paddr: int
    data: bytes
    memsz: int | None = None
    vaddr: int | None = None
    flags: int = 5  # R X
    type: int = PT_LOAD
    filesz: int | None = None  # override p_filesz (default len(data))


def make_elf(
    bits: int,
    entry: int,
    phs: list[Ph],
    *,
    machine: int | None = None,
    e_type: int = 2,
    ident: bytes | None = None,
    phnum: int | None = None,
    shoff: int = 0,
) -> bytes:
    """An ELF executable: header, program headers, then each segment's data 16-aligned."""
    ehsize, phentsize = (52, 32) if bits == 32 else (64, 56)
    machine = machine if machine is not None else (EM_386 if bits == 32 else EM_X86_64)
    body = bytearray()
    offsets = []
    cursor = ehsize + phentsize * len(phs)
    for ph in phs:
        pad = (-cursor) % 16
        body += bytes(pad)
        cursor += pad
        offsets.append(cursor)
        body += ph.data
        cursor += len(ph.data)
    table = bytearray()
    for ph, offset in zip(phs, offsets, strict=True):
        filesz = ph.filesz if ph.filesz is not None else len(ph.data)
        memsz = ph.memsz if ph.memsz is not None else len(ph.data)
        vaddr = ph.vaddr if ph.vaddr is not None else ph.paddr
        if bits == 32:
            table += struct.pack(
                "<8I", ph.type, offset, vaddr, ph.paddr, filesz, memsz, ph.flags, 16
            )
        else:
            table += struct.pack(
                "<IIQQQQQQ", ph.type, ph.flags, offset, vaddr, ph.paddr, filesz, memsz, 16
            )
    ident = ident or b"\x7fELF" + bytes([1 if bits == 32 else 2, 1, 1]) + bytes(9)
    count = phnum if phnum is not None else len(phs)
    fmt = "<HHIIIIIHHHHHH" if bits == 32 else "<HHIQQQIHHHHHH"
    header = ident + struct.pack(
        fmt, e_type, machine, 1, entry, ehsize, shoff, 0, ehsize, phentsize, count, 0, 0, 0
    )
    return bytes(header + table + body)


def mb_header(flags: int, *, checksum: int | None = None, kludge: tuple[int, ...] = ()) -> bytes:
    """A multiboot v1 header; ``kludge`` holds header/load/load_end/bss_end/entry addrs."""
    if checksum is None:
        checksum = -(MB_MAGIC + flags) & 0xFFFFFFFF
    return struct.pack("<3I", MB_MAGIC, flags, checksum) + struct.pack(f"<{len(kludge)}I", *kludge)


def kludge_image(
    *,
    load: int = 0x100000,
    skip: int = 0x20,
    code: bytes = b"\xf4" * 16,
    bss: int = 0x1000,
    entry_delta: int = 0x40,
    load_end: int | None = None,
    flags: int = 0x10003,
    header_addr: int | None = None,
) -> tuple[bytes, int]:
    """A flat a.out-kludge multiboot image: ``skip`` bytes of file before the loaded part
    (not loaded), the header at the start of the loaded part, then ``code``.  Returns the
    file and the length of the loaded part."""
    loaded_len = 48 + len(code)
    header = mb_header(
        flags,
        kludge=(
            header_addr if header_addr is not None else load,
            load,
            load + loaded_len if load_end is None else load_end,
            load + loaded_len + bss if bss else 0,
            load + entry_delta,
        ),
    )
    loaded = header.ljust(48, b"\0") + code
    return bytes(skip) + loaded, loaded_len


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def image_error(path: Path, **kwargs: object) -> str:
    """Load ``path``, expect an ImageError, check its one-line shape, return the fault."""
    with pytest.raises(ImageError) as info:
        load_image(path, ram_size=kwargs.pop("ram_size", RAM), **kwargs)  # type: ignore[arg-type]
    err = info.value
    assert err.path == path
    assert str(err).startswith(f"{path}: ") and "\n" not in str(err)
    assert err.exit_status == 2
    return err.fault


# ---- ELF ----------------------------------------------------------------------------------
def test_elf64_segments_entry_and_long_mode(tmp_path: Path) -> None:
    text, data = b"\x90" * 40 + b"\xf4", b"DATA" * 8
    path = write(
        tmp_path,
        "g.elf",
        make_elf(
            64,
            0x100010,
            [Ph(0x100000, text), Ph(0x102000, data, memsz=0x3000, flags=6)],
        ),
    )
    image = load_image(path, ram_size=RAM)
    assert (image.kind, image.mode, image.entry) == ("elf64", Mode.LONG, 0x100010)
    assert image.segments == (
        Segment(0x100000, text, len(text)),
        Segment(0x102000, data, 0x3000),
    )
    assert image.multiboot is None and image.path == path
    assert image.end == 0x105000


def test_elf32_is_protected_mode(tmp_path: Path) -> None:
    path = write(tmp_path, "g32.elf", make_elf(32, 0x200004, [Ph(0x200000, b"\x90" * 8)]))
    image = load_image(path, ram_size=RAM)
    assert (image.kind, image.mode, image.entry) == ("elf32", Mode.PROTECTED, 0x200004)
    assert image.segments == (Segment(0x200000, b"\x90" * 8, 8),)


def test_segments_go_to_paddr_and_a_virtual_entry_is_translated(tmp_path: Path) -> None:
    # Linked high (vaddr 0xffffffff80100000), loaded low, as kernels are: QEMU's rule.
    high = 0xFFFFFFFF80100000
    path = write(
        tmp_path,
        "high.elf",
        make_elf(64, high + 0x10, [Ph(0x100000, b"\x90" * 32, vaddr=high)]),
    )
    image = load_image(path, ram_size=RAM)
    assert image.segments[0].addr == 0x100000
    assert image.entry == 0x100010


def test_empty_and_non_load_segments_are_skipped(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "skip.elf",
        make_elf(
            64,
            0x100000,
            [Ph(0x100000, b"\xf4"), Ph(0x0, b"note", type=PT_NOTE), Ph(0x300000, b"", memsz=0)],
        ),
    )
    assert load_image(path, ram_size=RAM).segments == (Segment(0x100000, b"\xf4", 1),)


@pytest.mark.parametrize("bits", [32, 64])
def test_gcc_built_static_executable(tmp_path: Path, bits: int) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    src = write(
        tmp_path,
        "start.S",
        b".globl _start\n_start: hlt\n jmp _start\n.data\nvalue: .long 0x12345678\n"
        b".bss\n.lcomm buffer, 8192\n",
    )
    out = tmp_path / f"start{bits}"
    subprocess.run(
        ["gcc", f"-m{bits}", "-nostdlib", "-static", "-Wl,-Ttext=0x100000",
         "-Wl,--build-id=none", "-o", str(out), str(src)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    image = load_image(out, ram_size=RAM)
    assert image.kind == f"elf{bits}"
    assert image.entry == 0x100000
    text = next(s for s in image.segments if s.addr <= 0x100000 < s.end)
    assert text.data[0x100000 - text.addr] == 0xF4  # hlt at _start
    data = next(s for s in image.segments if b"\x78\x56\x34\x12" in s.data)
    assert data.memsz >= len(data.data) + 8192  # .bss rides in the data segment
    assert image.end <= RAM


# ---- flat ---------------------------------------------------------------------------------
def test_flat_binary_starts_at_its_load_address_in_the_mode_asked(tmp_path: Path) -> None:
    path = write(tmp_path, "flat.bin", b"\xb0\x07\xe6\x42\xf4")
    image = load_image(path, ram_size=RAM, load_addr=0x1000, flat_mode=Mode.REAL)
    assert (image.kind, image.mode, image.entry) == ("flat", Mode.REAL, 0x1000)
    assert image.segments == (Segment(0x1000, b"\xb0\x07\xe6\x42\xf4", 5),)
    assert load_image(path, ram_size=RAM, load_addr=0x100000).mode == Mode.LONG


# ---- multiboot ----------------------------------------------------------------------------
def test_multiboot_elf32_is_loaded_by_its_program_headers(tmp_path: Path) -> None:
    code = mb_header(0x3) + b"\xf4" * 4
    path = write(
        tmp_path,
        "mb.elf",
        make_elf(32, 0x10000C, [Ph(0x100000, code), Ph(0x101000, b"d", memsz=0x800, flags=6)]),
    )
    image = load_image(path, ram_size=RAM)
    assert (image.kind, image.mode, image.entry) == ("multiboot", Mode.PROTECTED, 0x10000C)
    assert image.segments == (Segment(0x100000, code, len(code)), Segment(0x101000, b"d", 0x800))
    mb = image.multiboot
    assert mb is not None and mb.flags == 3
    assert (mb.wants_page_align, mb.wants_mem_info, mb.wants_video) == (True, True, False)
    assert (mb.header_addr, mb.load_addr, mb.entry_addr) == (None, None, None)


def test_multiboot_aout_kludge_flat_image(tmp_path: Path) -> None:
    data, loaded_len = kludge_image(skip=0x20, bss=0x1000)
    path = write(tmp_path, "mb.bin", data)
    image = load_image(path, ram_size=RAM)
    assert (image.kind, image.mode, image.entry) == ("multiboot", Mode.PROTECTED, 0x100040)
    assert image.segments == (Segment(0x100000, data[0x20:], loaded_len + 0x1000),)
    mb = image.multiboot
    assert mb is not None and mb.flags == 0x10003
    assert (mb.header_addr, mb.load_addr) == (0x100000, 0x100000)
    assert (mb.load_end_addr, mb.bss_end_addr) == (0x100000 + loaded_len, 0x101000 + loaded_len)


def test_aout_kludge_header_inside_the_loaded_part(tmp_path: Path) -> None:
    # header_addr - load_addr = 0x10: the loaded part starts 0x10 bytes before the header,
    # load_end_addr 0 loads to the end of the file, bss_end_addr 0 means no BSS.
    prefix = b"P" * 0x10
    header = mb_header(0x10000, kludge=(0x200010, 0x200000, 0, 0, 0x200000))
    data = b"skipped!" * 2 + prefix + header + b"tail"
    path = write(tmp_path, "mb2.bin", data)
    image = load_image(path, ram_size=RAM)
    assert image.segments == (Segment(0x200000, prefix + header + b"tail", 0x10 + 32 + 4),)
    assert image.entry == 0x200000


def test_multiboot_header_wins_over_elf(tmp_path: Path) -> None:
    # An ELF64 with a kludge header is loaded by the header, like QEMU does.
    header = mb_header(0x10000, kludge=(0x300000, 0x300000, 0, 0, 0x300000))
    elf = make_elf(64, 0x100000, [Ph(0x100000, header + b"\xf4" * 8)])
    offset = elf.index(header)
    path = write(tmp_path, "both.elf", elf)
    image = load_image(path, ram_size=RAM)
    assert image.kind == "multiboot" and image.mode == Mode.PROTECTED
    assert image.segments == (Segment(0x300000, elf[offset:], len(elf) - offset),)


def test_video_mode_request_is_recorded_and_ignored(tmp_path: Path) -> None:
    code = mb_header(0x7) + bytes(32) + b"\xf4"
    path = write(tmp_path, "vbe.elf", make_elf(32, 0x100000, [Ph(0x100000, code)]))
    mb = load_image(path, ram_size=RAM).multiboot
    assert mb is not None and mb.wants_video


# ---- one ImageError per fault ---------------------------------------------------------------
def test_missing_empty_and_directory(tmp_path: Path) -> None:
    assert "cannot read" in image_error(tmp_path / "nope.elf")
    assert image_error(write(tmp_path, "empty", b"")) == "file is empty"
    (tmp_path / "dir").mkdir()
    assert image_error(tmp_path / "dir").startswith("is a directory, not a regular file")


def test_bad_magic_without_load_address(tmp_path: Path) -> None:
    fault = image_error(write(tmp_path, "junk", b"\x7fELG" + bytes(60)))
    assert "not an ELF file (bad magic 7f454c47)" in fault and "needs a load address" in fault


@pytest.mark.parametrize("cut", [10, 40])
def test_truncated_elf_header(tmp_path: Path, cut: int) -> None:
    full = make_elf(64, 0x100000, [Ph(0x100000, b"\xf4")])
    assert "truncated ELF" in image_error(write(tmp_path, "cut.elf", full[:cut]))


def test_truncated_program_headers(tmp_path: Path) -> None:
    full = make_elf(64, 0x100000, [Ph(0x100000, b"\xf4"), Ph(0x101000, b"x")])
    fault = image_error(write(tmp_path, "cutph.elf", full[:100]))
    assert "program headers 0x40-0xaf lie beyond the end of the file (0x64 bytes)" in fault


def test_bad_elf_ident_fields(tmp_path: Path) -> None:
    base = make_elf(64, 0x100000, [Ph(0x100000, b"\xf4")])
    bad_class = base[:4] + b"\x03" + base[5:]
    assert "bad ELF class 3" in image_error(write(tmp_path, "class.elf", bad_class))
    big = base[:5] + b"\x02" + base[6:]
    assert "big-endian ELF" in image_error(write(tmp_path, "big.elf", big))


def test_unsupported_machine_and_type(tmp_path: Path) -> None:
    arm = make_elf(64, 0x100000, [Ph(0x100000, b"\xf4")], machine=EM_AARCH64)
    assert "unsupported machine 183 (AArch64) for ELF64" in image_error(
        write(tmp_path, "arm.elf", arm)
    )
    x32 = make_elf(32, 0x100000, [Ph(0x100000, b"\xf4")], machine=EM_X86_64)
    assert "unsupported machine 62 (x86-64) for ELF32" in image_error(
        write(tmp_path, "x32.elf", x32)
    )
    rel = make_elf(64, 0, [Ph(0x100000, b"\xf4")], e_type=1)
    assert "ET_REL" in image_error(write(tmp_path, "obj.o", rel))


def test_dynamically_linked_elf(tmp_path: Path) -> None:
    elf = make_elf(64, 0x100000, [Ph(0, b"/lib/ld.so\0", type=PT_INTERP), Ph(0x100000, b"\xf4")])
    assert "PT_INTERP" in image_error(write(tmp_path, "dyn.elf", elf))


def test_pyelftools_errors_become_image_errors(tmp_path: Path) -> None:
    # e_phnum = PN_XNUM sends pyelftools to section header 0, which is past the end.
    elf = make_elf(64, 0x100000, [Ph(0x100000, b"\xf4")], phnum=0xFFFF, shoff=0x10000)
    assert "malformed ELF64 program headers" in image_error(write(tmp_path, "xnum.elf", elf))


def test_segment_file_range_beyond_eof(tmp_path: Path) -> None:
    elf = make_elf(64, 0x100000, [Ph(0x100000, b"\xf4" * 16, filesz=0x1000, memsz=0x1000)])
    fault = image_error(write(tmp_path, "short.elf", elf))
    assert "program header 0: file range 0x80-0x107f lies beyond the end of the file" in fault


def test_filesz_larger_than_memsz(tmp_path: Path) -> None:
    elf = make_elf(64, 0x100000, [Ph(0x100000, b"\xf4" * 16, memsz=8)])
    assert "p_filesz 0x10 is larger than p_memsz 0x8" in image_error(write(tmp_path, "fm.elf", elf))


def test_segment_outside_ram(tmp_path: Path) -> None:
    elf = make_elf(64, 0x3FF000, [Ph(0x3FF000, b"\xf4", memsz=0x2000)])
    fault = image_error(write(tmp_path, "big.elf", elf))
    assert "segment 0x3ff000-0x400fff lies outside guest RAM [0, 0x400000)" in fault


def test_segment_inside_a_reserved_range(tmp_path: Path) -> None:
    elf = make_elf(64, 0x20000, [Ph(0x1F000, b"\x90" * 0x2000)])
    fault = image_error(write(tmp_path, "low.elf", elf), reserved=[(0x20000, 0x2A000)])
    assert "overlaps the range 0x20000-0x29fff the runner reserves" in fault
    with pytest.raises(RunnerError, match=r"\(start, end\)"):
        load_image(tmp_path / "low.elf", ram_size=RAM, reserved=[(0x20000, 0xA000)])


def test_overlapping_segments(tmp_path: Path) -> None:
    elf = make_elf(64, 0x100000, [Ph(0x100000, b"\x90" * 0x100, memsz=0x2000), Ph(0x101000, b"x")])
    fault = image_error(write(tmp_path, "ovl.elf", elf))
    assert fault == "segments 0x100000-0x101fff and 0x101000-0x101000 overlap"


def test_entry_outside_every_segment(tmp_path: Path) -> None:
    elf = make_elf(64, 0x200000, [Ph(0x100000, b"\xf4" * 4)])
    fault = image_error(write(tmp_path, "entry.elf", elf))
    assert fault == "entry point 0x200000 is outside every segment (0x100000-0x100003)"


def test_no_loadable_segments(tmp_path: Path) -> None:
    elf = make_elf(64, 0x100000, [Ph(0, b"note", type=PT_NOTE)])
    assert "no loadable segments" in image_error(write(tmp_path, "none.elf", elf))


def test_real_mode_flat_image_must_sit_below_1m_and_16_aligned_above_64k(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, "real.bin", b"\xf4" * 0x100)
    assert load_image(path, ram_size=RAM, load_addr=0xFFC0, flat_mode=Mode.REAL).entry == 0xFFC0
    assert load_image(path, ram_size=RAM, load_addr=0x70000, flat_mode=Mode.REAL).entry == 0x70000
    fault = image_error(path, load_addr=0xFFFC0, flat_mode=Mode.REAL)
    assert "real-mode flat image must lie below 0x100000 (1 MiB)" in fault
    assert "must be a multiple of 16" in image_error(path, load_addr=0x10008, flat_mode=Mode.REAL)


def test_multiboot_bad_checksum(tmp_path: Path) -> None:
    path = write(tmp_path, "sum.bin", bytes(8) + mb_header(0x3, checksum=0x1234) + bytes(64))
    fault = image_error(path, load_addr=0x100000)
    assert fault.startswith("multiboot header at offset 0x8 has a bad checksum")


def test_multiboot_unsupported_required_flag(tmp_path: Path) -> None:
    code = mb_header(0x8 | 0x3) + b"\xf4"
    path = write(tmp_path, "flag.elf", make_elf(32, 0x100000, [Ph(0x100000, code)]))
    assert "requires flag bits 0x8 (flags 0xb)" in image_error(path)


def test_multiboot_without_kludge_needs_elf32(tmp_path: Path) -> None:
    path = write(tmp_path, "nokludge.bin", mb_header(0x3) + b"\xf4" * 16)
    assert "needs an ELF file" in image_error(path)
    elf64 = make_elf(64, 0x100000, [Ph(0x100000, mb_header(0x3) + b"\xf4")])
    assert "multiboot ELF64" in image_error(write(tmp_path, "mb64.elf", elf64))


def test_multiboot_truncated_header(tmp_path: Path) -> None:
    path = write(tmp_path, "mbcut.bin", mb_header(0x10003) + struct.pack("<I", 0x100000))
    assert "truncated multiboot header at offset 0x0" in image_error(path)


def test_aout_kludge_faults(tmp_path: Path) -> None:
    data, _ = kludge_image(load_end=0x100000 + 0x10000)
    fault = image_error(write(tmp_path, "eof.bin", data))
    assert "file range 0x20-0x1001f" in fault and "beyond the end of the file (0x60 bytes)" in fault
    data, _ = kludge_image(header_addr=0xFFFF0)
    assert "header_addr 0xffff0 is below load_addr 0x100000" in image_error(
        write(tmp_path, "hdr.bin", data)
    )
    data, _ = kludge_image(header_addr=0x100100)
    assert "larger than the header's file offset 0x20" in image_error(
        write(tmp_path, "off.bin", data)
    )
    data, _ = kludge_image(load_end=0xFF000)
    assert "load_end_addr 0xff000 is below load_addr" in image_error(
        write(tmp_path, "end.bin", data)
    )
    data, _ = kludge_image(entry_delta=0x5000)
    assert "entry point 0x105000 is outside every segment" in image_error(
        write(tmp_path, "ent.bin", data)
    )
    data, _ = kludge_image(load=0x3FF000, bss=0x2000)
    assert "lies outside guest RAM" in image_error(write(tmp_path, "ram.bin", data))


# ---- place() and the multiboot information block in a real VM ------------------------------
@pytest.fixture
def vm(require_kvm: None) -> Iterator[Vm]:
    with Kvm() as kvm, kvm.create_vm() as v:
        yield v


def test_place_writes_segments_and_zeroes_bss(tmp_path: Path, vm: Vm) -> None:
    vm.add_memory(0, RAM)
    vm.write(0x100000, b"\xaa" * 0x8000)  # dirty memory the loader must zero
    text, data = b"\x90" * 100 + b"\xf4", b"initialised data"
    path = write(
        tmp_path,
        "bss.elf",
        make_elf(64, 0x100000, [Ph(0x100000, text), Ph(0x102000, data, memsz=0x3000, flags=6)]),
    )
    place(load_image(path, ram_size=RAM), vm)
    assert vm.read(0x100000, len(text)) == text
    assert vm.read(0x100000 + len(text), 16) == b"\xaa" * 16  # beyond memsz: untouched
    assert vm.read(0x102000, len(data)) == data
    assert vm.read(0x102000 + len(data), 0x3000 - len(data)) == bytes(0x3000 - len(data))
    assert vm.read(0x105000, 16) == b"\xaa" * 16


def test_place_spans_memory_regions(tmp_path: Path, vm: Vm) -> None:
    vm.add_memory(0, MiB)
    vm.add_memory(MiB, MiB)
    vm.write(MiB, b"\xaa" * 0x2000)
    payload = bytes(range(256)) * 16
    path = write(tmp_path, "span.bin", payload)
    image = load_image(path, ram_size=2 * MiB, load_addr=MiB - 0x800)
    place(image, vm)
    assert vm.read(MiB - 0x800, 0x800) + vm.read(MiB, 0x800) == payload


def test_place_into_too_little_memory_is_an_image_error(tmp_path: Path, vm: Vm) -> None:
    vm.add_memory(0, MiB)
    path = write(tmp_path, "high.elf", make_elf(64, 0x200000, [Ph(0x200000, b"\xf4")]))
    image = load_image(path, ram_size=RAM)
    with pytest.raises(ImageError, match=r"high\.elf: segment 0x200000-0x200000 does not fit"):
        place(image, vm)


def read_info(vm: Vm, addr: int) -> dict[str, int]:
    names = ["flags", "mem_lower", "mem_upper", "boot_device", "cmdline", "mods_count",
             "mods_addr", "syms0", "syms1", "syms2", "syms3", "mmap_length", "mmap_addr",
             "drives_length", "drives_addr", "config_table", "boot_loader_name"]  # fmt: skip
    return dict(zip(names, struct.unpack("<17I", vm.read(addr, 68)), strict=True))


def c_string(vm: Vm, addr: int) -> str:
    raw = vm.read(addr, 0x10000 - addr) if addr < 0x10000 else vm.read(addr, 256)
    return raw[: raw.index(b"\0")].decode()


def multiboot_image(tmp_path: Path) -> LoadedImage:
    data, _ = kludge_image(bss=0x2345)
    return load_image(write(tmp_path, "kernel.bin", data), ram_size=RAM)


def mmap_entries(vm: Vm, info: dict[str, int]) -> list[tuple[int, int, int]]:
    raw = vm.read(info["mmap_addr"], info["mmap_length"])
    entries = [struct.unpack_from("<IQQI", raw, off) for off in range(0, len(raw), 24)]
    assert all(size == 20 for size, *_ in entries)
    return [(base, length, kind) for _size, base, length, kind in entries]


def test_multiboot_info_block_where_qemu_puts_it(tmp_path: Path, vm: Vm) -> None:
    vm.add_memory(0, RAM)
    image = multiboot_image(tmp_path)  # loaded at 0x100000, 0x2345 bytes of BSS
    mod_a = write(tmp_path, "a.mod", b"module A contents")
    mod_b = write(tmp_path, "b.mod", b"B" * 5000)
    ebx = build_multiboot_info(
        vm,
        image,
        ram_size=RAM,
        cmdline="kernel.bin console=ttyS0 quiet",
        modules=[Module(mod_a, "a.mod arg=1"), Module(mod_b, "b.mod")],
    )
    assert ebx == 0x9500 and MULTIBOOT_BOOTLOADER_MAGIC == 0x2BADB002
    info = read_info(vm, ebx)
    assert info["flags"] == 1 | 2 | 4 | 8 | 0x40 | 0x200
    assert info["boot_device"] == 0x8000FFFF
    # QEMU 7.2 + SeaBIOS: 639 KiB low, upper memory up to 128 KiB below the top of RAM
    assert (info["mem_lower"], info["mem_upper"]) == (639, (RAM - 0x20000 - MiB) // 1024)
    assert info["mmap_addr"] == 0x9000
    assert c_string(vm, info["cmdline"]) == "kernel.bin console=ttyS0 quiet"
    assert c_string(vm, info["boot_loader_name"]) == "kvmkit"
    # module table and strings right after the image (load_addr + page-aligned size),
    # module strings first, then the command line, then the loader name (QEMU's order)
    after = 0x100000 + ((image.end - 0x100000 + 0xFFF) & ~0xFFF)
    assert info["mods_addr"] == after and info["mods_count"] == 2
    mods = [struct.unpack_from("<4I", vm.read(after, 32), i * 16) for i in range(2)]
    assert mods[0][2] == after + 32
    assert c_string(vm, mods[0][2]) == "a.mod arg=1"
    assert info["cmdline"] == after + 32 + len("a.mod arg=1\0b.mod\0")
    first = after + 0x1000
    assert mods[0][:2] == (first, first + 17)
    assert mods[1][:2] == (first + 0x1000, first + 0x1000 + 5000)
    assert vm.read(mods[0][0], 17) == b"module A contents"
    assert vm.read(mods[1][0], 5000) == b"B" * 5000
    assert c_string(vm, mods[1][2]) == "b.mod"


#: The e820 maps QEMU 7.2 (-M pc, SeaBIOS) gave a multiboot kernel on this host, read
#: back by a kernel that dumps its multiboot information (-accel tcg; under KVM QEMU adds
#: the identity-map/TSS entry at 0xfeffc000, which kvmkit reports too).
_QEMU_MAPS = {
    1 << 30: [
        (0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xF0000, 0x10000, 2),
        (0x100000, 0x3FEE0000, 1), (0x3FFE0000, 0x20000, 2), (0xFFFC0000, 0x40000, 2),
    ],
    3584 << 20: [
        (0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xF0000, 0x10000, 2),
        (0x100000, 0xBFEE0000, 1), (0xBFFE0000, 0x20000, 2), (0xFFFC0000, 0x40000, 2),
        (0x100000000, 0x20000000, 1),
    ],
    6 << 30: [
        (0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xF0000, 0x10000, 2),
        (0x100000, 0xBFEE0000, 1), (0xBFFE0000, 0x20000, 2), (0xFFFC0000, 0x40000, 2),
        (0x100000000, 0xC0000000, 1),
    ],
    3328 << 20: [
        (0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xF0000, 0x10000, 2),
        (0x100000, 0xCFEE0000, 1), (0xCFFE0000, 0x20000, 2), (0xFFFC0000, 0x40000, 2),
    ],
}  # fmt: skip
_QEMU_MEM_UPPER = {1 << 30: 1047424, 3584 << 20: 3144576, 6 << 30: 3144576, 3328 << 20: 3406720}
_KVM_ENTRY = (0xFEFFC000, 0x4000, 2)
_AMD_HT = (0xFD00000000, 0x300000000, 2)


@pytest.mark.parametrize("ram", sorted(_QEMU_MAPS), ids=lambda r: f"{r >> 20}M")
@pytest.mark.parametrize("amd", [False, True], ids=["intel", "amd"])
def test_memory_map_and_mem_upper_are_qemus(tmp_path: Path, vm: Vm, ram: int, amd: bool) -> None:
    from kvmkit.runner.loaders.layout import e820_map

    vm.add_memory(0, 2 * MiB)  # the block and the strings need nothing else
    ebx = build_multiboot_info(
        vm,
        multiboot_image(tmp_path),
        ram_size=ram,
        cmdline="k",
        e820=e820_map(ram, amd_ht_hole=amd),
    )
    info = read_info(vm, ebx)
    assert (info["mem_lower"], info["mem_upper"]) == (639, _QEMU_MEM_UPPER[ram])
    expected = sorted(_QEMU_MAPS[ram] + [_KVM_ENTRY] + ([_AMD_HT] if amd else []))
    assert mmap_entries(vm, info) == expected


@pytest.mark.parametrize(
    ("ram", "below", "above"),
    [
        (64 * MiB, 64 * MiB, 0),
        (1 << 30, 1 << 30, 0),
        (3328 * MiB, 3328 * MiB, 0),  # below 3.5 GiB: all of it at 0
        (3584 * MiB, 3 << 30, 512 * MiB),  # from 3.5 GiB: 3 GiB at 0, the rest at 4 GiB
        (6 << 30, 3 << 30, 3 << 30),
    ],
)
def test_ram_split_is_the_pc_machines(ram: int, below: int, above: int) -> None:
    from kvmkit.runner.loaders.layout import HIGH_RAM_BASE, pc_ram_layout

    layout = pc_ram_layout(ram)
    assert (layout.below_4g, layout.above_4g) == (below, above)
    assert layout.regions == [(0, below)] + ([(HIGH_RAM_BASE, above)] if above else [])


def test_module_beyond_ram_names_the_module_and_writes_nothing(tmp_path: Path, vm: Vm) -> None:
    vm.add_memory(0, 2 * MiB)
    image = multiboot_image(tmp_path)
    small = write(tmp_path, "small.mod", b"s")
    huge = write(tmp_path, "huge.mod", bytes(MiB))
    with pytest.raises(ImageError) as info:
        build_multiboot_info(
            vm, image, ram_size=2 * MiB, cmdline="k",
            modules=[Module(small, "small"), Module(huge, "huge")],
        )  # fmt: skip
    assert info.value.path == huge
    assert str(info.value) == (
        f"{huge}: module (0x100000 bytes) at 0x105000-0x204fff does not fit in the guest's "
        "0x200000 bytes of RAM below 4 GiB; give the guest more memory"
    )
    assert vm.read(0x9000, 0x600) == bytes(0x600)
    assert vm.read(0x103000, 0x2000) == bytes(0x2000)


def test_unreadable_module_names_the_module(tmp_path: Path, vm: Vm) -> None:
    vm.add_memory(0, 2 * MiB)
    with pytest.raises(ImageError, match=r"missing\.mod: cannot read module"):
        build_multiboot_info(
            vm, multiboot_image(tmp_path), ram_size=2 * MiB, cmdline="k",
            modules=[Module(tmp_path / "missing.mod", "m")],
        )  # fmt: skip
    with pytest.raises(ImageError, match=r"is a character device, not a regular file"):
        build_multiboot_info(
            vm, multiboot_image(tmp_path), ram_size=2 * MiB, cmdline="k",
            modules=[Module(Path("/dev/zero"), "zero")],
        )  # fmt: skip


def test_a_long_command_line_goes_after_the_image(tmp_path: Path, vm: Vm) -> None:
    vm.add_memory(0, 2 * MiB)
    ebx = build_multiboot_info(vm, multiboot_image(tmp_path), ram_size=2 * MiB, cmdline="x" * 30000)
    assert vm.read(read_info(vm, ebx)["cmdline"], 30001) == b"x" * 30000 + b"\0"
    with pytest.raises(ImageError, match="does not fit in the guest's 0x200000 bytes"):
        build_multiboot_info(
            vm, multiboot_image(tmp_path), ram_size=2 * MiB, cmdline="x" * 0x100000
        )


def test_a_kernel_over_0x9000_gets_the_block_after_itself(tmp_path: Path, vm: Vm) -> None:
    vm.add_memory(0, 2 * MiB)
    data, _ = kludge_image(load=0x8000, bss=0x2000)  # 0x8000-0xa04f: covers 0x9000-0x9557
    image = load_image(write(tmp_path, "low.bin", data), ram_size=2 * MiB)
    place(image, vm)
    ebx = build_multiboot_info(vm, image, ram_size=2 * MiB, cmdline="low.bin")
    assert ebx >= 0xB000  # after the image, not at QEMU's 0x9500
    info = read_info(vm, ebx)
    assert info["mmap_addr"] >= 0xB000 and info["mem_lower"] == 639
    assert c_string(vm, info["cmdline"]) == "low.bin"
    assert vm.read(0x8000, len(data) - 0x20) == data[0x20:]  # the kernel is intact


# A multiboot kernel (32-bit code after the header): print the command line, the first 4
# bytes of module 0 and "1" when mbi->flags has MEM|CMDLINE|MODS|MMAP|BOOT_LOADER_NAME to
# port 0xe9 (QEMU isa-debugcon), then write 0x10 to port 0xf4 (isa-debug-exit) and halt.
_REPORTER = bytes.fromhex(
    "8b7310"  # 00 mov 0x10(%ebx),%esi      mbi->cmdline
    "66bae900"  # 03 mov $0xe9,%dx
    "ac"  # 07 lodsb
    "84c0"  # 08 test %al,%al
    "7403"  # 0a jz 0x0f
    "ee"  # 0c out %al,(%dx)
    "ebf8"  # 0d jmp 0x07
    "8b7318"  # 0f mov 0x18(%ebx),%esi      mbi->mods_addr
    "8b36"  # 12 mov (%esi),%esi           mods[0].mod_start
    "b904000000"  # 14 mov $4,%ecx
    "f36e"  # 19 rep outsb
    "8b03"  # 1b mov (%ebx),%eax           mbi->flags
    "254d020000"  # 1d and $0x24d,%eax
    "3d4d020000"  # 22 cmp $0x24d,%eax
    "0f94c0"  # 27 sete %al
    "0430"  # 2a add $'0',%al
    "ee"  # 2c out %al,(%dx)
    "b010"  # 2d mov $0x10,%al
    "e6f4"  # 2f out %al,$0xf4
    "f4"  # 31 hlt
)
_EXPECTED_CONSOLE = "kernel.bin hello" + "MOD!" + "1"


def reporter_files(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """The reporter as an a.out-kludge flat image or as a multiboot ELF32."""
    if kind == "kludge":
        data, _ = kludge_image(code=_REPORTER, entry_delta=48)
    else:
        data = make_elf(32, 0x10000C, [Ph(0x100000, mb_header(0x3) + _REPORTER)])
    kernel = write(tmp_path, "kernel.bin", data)
    return kernel, write(tmp_path, "initrd", b"MOD!rest of the module")


@pytest.mark.parametrize("kind", ["kludge", "elf32"])
def test_a_multiboot_kernel_reads_its_info_block_on_the_vcpu(
    tmp_path: Path, vm: Vm, kind: str
) -> None:
    vm.add_memory(0, RAM)
    kernel, module = reporter_files(tmp_path, kind)
    image = load_image(kernel, ram_size=RAM, reserved=[(0x20000, 0x2A000)])
    place(image, vm)
    ebx = build_multiboot_info(
        vm, image, ram_size=RAM, cmdline="kernel.bin hello", modules=[Module(module, "initrd")]
    )
    cpu = vm.create_vcpu(0)
    setup_protected_mode(cpu, entry=image.entry, stack=0x80000)
    regs = cpu.get_regs()
    regs.rax, regs.rbx = MULTIBOOT_BOOTLOADER_MAGIC, ebx
    cpu.set_regs(regs)
    console = bytearray()
    for _ in range(100):  # bounded: the program makes about 20 exits
        exit_ = cpu.run()
        assert isinstance(exit_, IoOut), exit_
        if exit_.port == 0xF4:
            assert exit_.value == 0x10
            break
        assert exit_.port == 0xE9
        console += exit_.data
    else:
        pytest.fail("the guest never wrote to the exit port")
    assert console.decode() == _EXPECTED_CONSOLE
    assert cpu.run() == Hlt()


@pytest.mark.parametrize("kind", ["kludge", "elf32"])
def test_the_same_kernel_under_qemu_prints_the_same(
    tmp_path: Path, qemu_binary: str, kind: str
) -> None:
    kernel, module = reporter_files(tmp_path, kind)
    out = tmp_path / "debugcon.txt"
    proc = subprocess.run(
        [qemu_binary, "-accel", "tcg", "-machine", "pc", "-m", "16", "-nodefaults",
         "-display", "none", "-no-reboot", "-kernel", kernel.name, "-append", "hello",
         "-initrd", module.name, "-chardev", f"file,id=dbg,path={out}",
         "-device", "isa-debugcon,iobase=0xe9,chardev=dbg",
         "-device", "isa-debug-exit,iobase=0xf4,iosize=1"],
        cwd=tmp_path, capture_output=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == (0x10 << 1) | 1, proc.stderr
    assert out.read_text() == _EXPECTED_CONSOLE


# ---- the runner places its own things around the image -------------------------------------
@pytest.mark.parametrize(
    ("load", "bss"),
    [
        (0x8000, 0x1000),  # over QEMU's 0x9000 block (was refused: "overlaps image segment")
        (0x10000, 0x70000),  # over the runner's default tables (0x20000) and stack (0x70000)
    ],
)
def test_run_guest_places_info_tables_and_stack_around_a_low_kernel(
    tmp_path: Path, run_image: Callable[..., RunResult], load: int, bss: int
) -> None:
    data, _ = kludge_image(load=load, code=_REPORTER, entry_delta=48, bss=bss)
    kernel = write(tmp_path, "kernel.bin", data)
    module = write(tmp_path, "initrd", b"MOD!rest of the module")
    result = run_image(kernel, append="hello", modules=[module], timeout=60.0)
    assert (result.reason, result.exit_code) == ("exit", 0x10), result.detail
    assert result.console == "kernel.bin hello" + "MOD!" + "1"


# Real mode: push/pop through the stack the runner chose, print "AB", exit with 7.
_REAL_MODE = bytes.fromhex(
    "b041e6e9"  # mov al,'A'; out 0xe9,al
    "b84242"  # mov ax,0x4242
    "50"  # push ax
    "5b"  # pop bx
    "88d8e6e9"  # mov al,bl; out 0xe9,al
    "b007e6f4"  # mov al,7; out 0xf4,al
    "f4"  # hlt
)


@pytest.mark.parametrize("load", [0x1000, 0x7C00, 0x70000, 0x8FFF0])
def test_real_mode_flat_image_runs(
    tmp_path: Path, run_image: Callable[..., RunResult], load: int
) -> None:
    image = write(tmp_path, "real.bin", _REAL_MODE)
    result = run_image(image, mode=Mode.REAL, load_addr=load, timeout=60.0)
    assert (result.reason, result.exit_code, result.console) == ("exit", 7, "AB"), result.detail
    assert result.mode == "real"


# A multiboot kernel that writes its whole multiboot_info and then the memory map, raw, to
# port 0xe9, then 0x10 to port 0xf4.
_DUMPER = bytes.fromhex(
    "89de"  # mov esi, ebx
    "b958000000"  # mov ecx, 88
    "66bae900"  # mov dx, 0xe9
    "f36e"  # rep outsb
    "8b4b2c"  # mov ecx, [ebx+44]   mmap_length
    "8b7330"  # mov esi, [ebx+48]   mmap_addr
    "f36e"  # rep outsb
    "b010"  # mov al, 0x10
    "e6f4"  # out 0xf4, al
    "f4"  # hlt
)
_KVM_ONLY = struct.pack("<IQQI", 20, 0xFEFFC000, 0x4000, 2)  # QEMU adds it under KVM only


def _split_dump(raw: bytes) -> tuple[list[int], list[bytes]]:
    fields = list(struct.unpack_from("<22I", raw))
    entries = [raw[off : off + 24] for off in range(88, len(raw), 24)]
    return fields, entries


@pytest.mark.parametrize("ram_mib", [64, 1024, 3584, 6144])
def test_multiboot_info_is_what_qemu_gives_the_same_kernel(
    tmp_path: Path, vm: Vm, qemu_binary: str, ram_mib: int
) -> None:
    from kvmkit.runner.loaders.layout import amd_ht_hole, e820_map

    data, _ = kludge_image(code=_DUMPER, entry_delta=48, bss=0x1000)
    kernel = write(tmp_path, "kernel.bin", data)
    module = write(tmp_path, "initrd", b"module")
    out = tmp_path / "debugcon.bin"
    proc = subprocess.run(
        [qemu_binary, "-accel", "tcg", "-machine", "pc", "-m", f"{ram_mib}M", "-nodefaults",
         "-display", "none", "-no-reboot", "-kernel", kernel.name, "-append", "a b",
         "-initrd", "initrd x=1", "-chardev", f"file,id=dbg,path={out}",
         "-device", "isa-debugcon,iobase=0xe9,chardev=dbg",
         "-device", "isa-debug-exit,iobase=0xf4,iosize=1"],
        cwd=tmp_path, capture_output=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == (0x10 << 1) | 1, proc.stderr
    qemu_fields, qemu_map = _split_dump(out.read_bytes())

    vm.add_memory(0, 2 * MiB)
    ram = ram_mib * MiB
    image = load_image(kernel, ram_size=2 * MiB)
    place(image, vm)
    with Kvm() as kvm:
        e820 = e820_map(ram, amd_ht_hole=amd_ht_hole(kvm.supported_cpuid()))
    ebx = build_multiboot_info(
        vm, image, ram_size=ram, cmdline="kernel.bin a b",
        modules=[Module(module, "initrd x=1")], e820=e820,
    )  # fmt: skip
    cpu = vm.create_vcpu(0)
    setup_protected_mode(cpu, entry=image.entry, stack=0x80000)
    regs = cpu.get_regs()
    regs.rax, regs.rbx = MULTIBOOT_BOOTLOADER_MAGIC, ebx
    cpu.set_regs(regs)
    dump = bytearray()
    for _ in range(1000):
        exit_ = cpu.run()
        assert isinstance(exit_, IoOut), exit_
        if exit_.port == 0xF4:
            break
        dump += exit_.data
    ours_fields, ours_map = _split_dump(bytes(dump))
    assert _KVM_ONLY in ours_map
    ours_map.remove(_KVM_ONLY)
    amd_entry = struct.pack("<IQQI", 20, 0xFD00000000, 0x300000000, 2)
    if amd_entry not in ours_map:  # QEMU's TCG CPU (qemu64) is AMD; under KVM QEMU
        qemu_map.remove(amd_entry)  # takes the host's vendor, as kvmkit does
    assert ours_map == qemu_map
    # every field but mmap_length (one entry longer: the KVM entry) and the name's text
    ours_fields[11] = qemu_fields[11] = 0
    assert ours_fields == qemu_fields
