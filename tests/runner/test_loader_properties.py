"""Hostile images, tried by Hypothesis: arbitrary files and mutated ELF and multiboot
headers give a clear :class:`ImageError` or a valid load — every segment inside guest RAM
and apart from the runner's reserved range, the entry inside a segment — and a valid load
is placed in a real VM of exactly that RAM without touching anything outside it; a
multiboot information block is laid out inside the RAM below 4 GiB, clear of the image.
Never another exception type."""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_loaders import Ph, make_elf, mb_header

from kvmkit.kvm import Kvm, Vm
from kvmkit.kvm.modes import Mode
from kvmkit.runner.errors import ImageError
from kvmkit.runner.loaders import LoadedImage, load_image, place, plan_multiboot_info

RAM = 4 << 20
RESERVED = (0x20000, 0x2B000)
PROPERTY = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
u32 = st.integers(0, 0xFFFFFFFF)


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kvmkit-props-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def vm(require_kvm: None) -> Iterator[Vm]:
    with Kvm() as kvm, kvm.create_vm() as v:
        v.add_memory(0, RAM)
        yield v


def check(scratch: Path, data: bytes, vm: Vm | None = None, **kw: object) -> LoadedImage | None:
    """Load ``data``; an ImageError is an answer, anything else fails the property."""
    path = scratch / "image"
    path.write_bytes(data)
    try:
        image = load_image(path, ram_size=RAM, reserved=[RESERVED], **kw)  # type: ignore[arg-type]
    except ImageError as exc:
        assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc)
        event("refused")
        return None
    event(f"loaded as {image.kind}")
    loaded = [s for s in image.segments if s.memsz]
    assert loaded
    for seg in loaded:
        assert seg.addr >= 0 and seg.end <= RAM, seg.describe()
        assert seg.end <= RESERVED[0] or seg.addr >= RESERVED[1], seg.describe()
        assert len(seg.data) <= seg.memsz
    assert any(s.addr <= image.entry < s.end for s in loaded)
    if vm is not None:
        place(image, vm)  # exactly RAM is mapped: a write outside it would raise
    return image


def check_multiboot(image: LoadedImage) -> None:
    try:
        plan = plan_multiboot_info(image, ram_size=RAM, cmdline="kernel args")
    except ImageError:
        return
    segments = [(s.addr, s.end) for s in image.segments if s.memsz]
    assert 0 <= plan.info_addr < RAM
    for start, end in plan.ranges:
        assert 0 <= start < end <= RAM
        assert all(end <= s or e <= start for s, e in segments), (start, end)


@PROPERTY
@given(data=st.binary(min_size=0, max_size=2048), load_addr=st.none() | st.integers(-8, 1 << 40))
def test_arbitrary_files(scratch: Path, vm: Vm, data: bytes, load_addr: int | None) -> None:
    check(scratch, data, vm, load_addr=load_addr)


@PROPERTY
@given(
    bits=st.sampled_from([32, 64]),
    mutations=st.lists(st.tuples(st.integers(0, 0x17F), st.integers(0, 255)), max_size=8),
    paddr=st.sampled_from([0x0, 0x1000, 0x1F000, 0x100000, 0x3FF000, 0xFFFFF000]),
    memsz=st.integers(0, 0x10000),
)
def test_mutated_elf_headers(
    scratch: Path, vm: Vm, bits: int, mutations: list[tuple[int, int]], paddr: int, memsz: int
) -> None:
    code = b"\x90" * 0x40 + b"\xf4"
    elf = bytearray(
        make_elf(bits, paddr, [Ph(paddr, code, memsz=max(memsz, len(code))), Ph(0, b"n", type=4)])
    )
    for offset, value in mutations:
        if offset < len(elf):
            elf[offset] = value
    check(scratch, bytes(elf), vm)


@PROPERTY
@given(
    flags=st.sampled_from([0x10000, 0x10003, 0x10007, 0x10008, 0x3, 0x0]) | u32,
    fields=st.tuples(u32, u32, u32, u32, u32),
    skip=st.integers(0, 64).map(lambda n: n * 4),
    tail=st.binary(max_size=256),
)
def test_mutated_multiboot_headers(
    scratch: Path,
    vm: Vm,
    flags: int,
    fields: tuple[int, int, int, int, int],
    skip: int,
    tail: bytes,
) -> None:
    data = bytes(skip) + mb_header(flags, kludge=fields) + tail
    image = check(scratch, data, vm)
    if image is not None:
        assert image.kind == "multiboot" and image.mode is Mode.PROTECTED
        check_multiboot(image)


@PROPERTY
@given(
    load=st.integers(0, RAM // 0x1000).map(lambda n: n * 0x1000) | u32,
    skip=st.integers(0, 16).map(lambda n: n * 4),
    header_delta=st.integers(-0x40, 0x40),
    load_end_delta=st.none() | st.integers(-0x40, 0x100),
    bss=st.none() | st.integers(-0x10, 0x200000),
    entry_delta=st.integers(-0x100, 0x3000),
)
def test_plausible_multiboot_kernels(
    scratch: Path,
    vm: Vm,
    load: int,
    skip: int,
    header_delta: int,
    load_end_delta: int | None,
    bss: int | None,
    entry_delta: int,
) -> None:
    """Kernels near the valid ones: a.out-kludge fields a little off in every direction."""
    code = b"\xf4" * 64
    loaded = 48 + len(code)
    wrap = 0xFFFFFFFF
    fields = (
        (load + header_delta) & wrap,
        load & wrap,
        0 if load_end_delta is None else (load + loaded + load_end_delta) & wrap,
        0 if bss is None else (load + loaded + bss) & wrap,
        (load + entry_delta) & wrap,
    )
    data = bytes(skip) + mb_header(0x10003, kludge=fields).ljust(48, b"\0") + code
    image = check(scratch, data, vm)
    if image is not None:
        check_multiboot(image)


@PROPERTY
@given(
    load_addr=st.integers(0, 0x110000),
    size=st.integers(1, 0x20000),
    mode=st.sampled_from(list(Mode)),
)
def test_flat_images(scratch: Path, vm: Vm, load_addr: int, size: int, mode: Mode) -> None:
    image = check(scratch, b"\xf4" * size, vm, load_addr=load_addr, flat_mode=mode)
    if image is not None and mode is Mode.REAL:
        assert image.end <= 0x100000
        assert load_addr <= 0xFFFF or load_addr % 16 == 0


def test_an_elf_with_a_program_header_table_far_beyond_the_file(scratch: Path) -> None:
    # The kind of header the properties mutate into: e_phoff past the end of the file.
    elf = bytearray(make_elf(64, 0x100000, [Ph(0x100000, b"\xf4")]))
    struct.pack_into("<Q", elf, 32, 1 << 40)
    path = scratch / "far.elf"
    path.write_bytes(bytes(elf))
    with pytest.raises(ImageError, match="program headers 0x10000000000-.* lie beyond the end"):
        load_image(path, ram_size=RAM)
