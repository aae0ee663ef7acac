"""The guest builder: image format, the cache, rebuilds on change, build errors, concurrency,
and the Python ABI constants agreeing with csrc/guests/kvmkit_guest.h."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from guest_qemu import boot_under_qemu

from kvmkit import guests
from kvmkit.errors import KvmkitError
from kvmkit.guests import GuestBuildError, build_guest


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, empty build cache for this test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("KVMKIT_CACHE", str(root))
    return root


@pytest.fixture
def sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the guest sources the test may edit."""
    copy = tmp_path / "src"
    shutil.copytree(guests.guest_source_dir(), copy)
    monkeypatch.setenv("KVMKIT_GUEST_SRC", str(copy))
    return copy


@pytest.fixture
def fresh_toolchain_probe() -> Iterator[None]:
    guests._toolchain_id.cache_clear()
    yield
    guests._toolchain_id.cache_clear()


@pytest.mark.parametrize("name", guests.GUEST_NAMES)
def test_image_is_a_multiboot_elf32_loaded_at_1mib(cache: Path, name: str) -> None:
    image = build_guest(name)
    assert image.parent.parent == cache / "guests"
    assert image.name == f"{name}.elf"
    data = image.read_bytes()
    with image.open("rb") as f:
        elf = ELFFile(f)
        assert (elf.elfclass, elf["e_machine"]) == (32, "EM_386")  # QEMU refuses ELF64
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        assert loads and min(s["p_paddr"] for s in loads) == guests.LOAD_ADDR
        end = max(s["p_paddr"] + s["p_memsz"] for s in loads)
        assert end <= guests.IMAGE_END_MAX < guests.MIN_GUEST_RAM
        first = loads[0]
        assert first["p_paddr"] <= elf["e_entry"] < first["p_paddr"] + first["p_filesz"]
    # The multiboot header: 4-byte aligned in the first 8 KiB, checksum makes the sum 0.
    offsets = [m.start() for m in re.finditer(re.escape(b"\x02\xb0\xad\x1b"), data[:8192])]
    assert [o for o in offsets if o % 4 == 0], "no multiboot header in the first 8 KiB"
    magic, flags, checksum = struct.unpack_from("<III", data, offsets[0])
    assert magic == guests.MULTIBOOT_HEADER_MAGIC
    assert (magic + flags + checksum) & 0xFFFFFFFF == 0
    assert flags & 0x10000 == 0  # no a.out kludge: loaders use the ELF program headers


def test_second_build_comes_from_the_cache(cache: Path) -> None:
    first = build_guest("hello")
    stamp = first.stat().st_mtime_ns
    again = build_guest("hello")
    assert again == first
    assert again.stat().st_mtime_ns == stamp
    assert not list((cache / "guests").glob("*/.build-*"))  # no temp dirs left behind


def test_a_cached_build_runs_no_tool(
    cache: Path, monkeypatch: pytest.MonkeyPatch, fresh_toolchain_probe: None
) -> None:
    first = build_guest("hello")
    guests._toolchain_id.cache_clear()  # a new process: nothing remembered in memory

    def no_tools(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a cached build ran {args}")

    monkeypatch.setattr(subprocess, "run", no_tools)
    assert build_guest("hello") == first  # the key came from the memo, not from gcc


def test_a_changed_tool_is_asked_for_its_version_again(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_toolchain_probe: None
) -> None:
    first = build_guest("hello")
    guests._toolchain_id.cache_clear()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("gcc", "ld", "objcopy"):  # the same tools behind other paths
        (bin_dir / tool).symlink_to(shutil.which(tool) or tool)
    (bin_dir / "gcc").unlink()
    (bin_dir / "gcc").write_text(f'#!/bin/sh\nexec {shutil.which("gcc")} "$@"\n')
    (bin_dir / "gcc").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    calls: list[object] = []
    real_run = subprocess.run

    def counting_run(*args: object, **kwargs: object) -> object:
        calls.append(args)
        return real_run(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(subprocess, "run", counting_run)
    assert build_guest("hello") == first  # same versions: the same key, the cached image
    assert calls  # ... but found by asking the (new) gcc, not from the memo


def test_changed_sources_build_a_new_image(
    cache: Path, sources: Path, qemu_binary: str, tmp_path: Path
) -> None:
    before = build_guest("hello")
    hello = sources / "hello.c"
    hello.write_text(hello.read_text().replace("Hello from kvmkit guest", "Edited guest"))
    after = build_guest("hello")
    assert after != before and before.is_file()
    boot = boot_under_qemu(qemu_binary, after, tmp_path)
    assert boot.console == "Edited guest\n"


def test_compile_error_carries_the_compiler_output(cache: Path, sources: Path) -> None:
    (sources / "smp.c").write_text('#include "kvmkit_guest.h"\nint main(void) { return nope; }\n')
    with pytest.raises(GuestBuildError) as info:
        build_guest("smp")
    err = info.value
    assert isinstance(err, KvmkitError)
    assert "compiling smp.c for guest 'smp' failed" in err.message
    assert "nope" in err.output and "error" in err.output
    assert "nope" in str(err)
    assert not list(cache.rglob("*.elf")) and not list(cache.rglob(".build-*"))


def test_unknown_guest_names_the_known_ones(cache: Path) -> None:
    with pytest.raises(GuestBuildError, match="unknown guest program 'hullo'") as info:
        build_guest("hullo")
    assert "hello, compute, io-storm, mmio-storm, smp" in str(info.value)


def test_missing_sources_say_where_they_were_looked_for(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVMKIT_GUEST_SRC", str(tmp_path / "nowhere"))
    with pytest.raises(GuestBuildError, match="guest sources missing: .*nowhere/entry.S"):
        build_guest("hello")


def test_missing_compiler_is_a_clear_error(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_toolchain_probe: None
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no gcc, ld or objcopy
    with pytest.raises(GuestBuildError, match="gcc not found on PATH") as info:
        build_guest("hello")
    assert info.value.hint and "binutils" in info.value.hint


def test_concurrent_builds_agree(cache: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(build_guest("compute"))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 4
    assert len(set(results)) == 1
    with results[0].open("rb") as f:
        assert ELFFile(f).elfclass == 32
    assert [p.name for p in results[0].parent.iterdir()] == ["compute.elf"]


REPO = Path(guests.__file__).resolve().parents[1]

HEADER_TO_PYTHON = {
    "KK_PORT_DEBUGCON": "PORT_DEBUGCON",
    "KK_PORT_EXIT": "PORT_EXIT",
    "KK_HYPERCALL_BASE": "HYPERCALL_BASE",
    "KK_HC_TIME": "HC_TIME",
    "KK_HC_PUTS": "HC_PUTS",
    "KK_HC_EXIT": "HC_EXIT",
    "KK_HC_MARK": "HC_MARK",
    "KK_PORT_FW_CFG_SELECTOR": "PORT_FW_CFG_SELECTOR",
    "KK_PORT_FW_CFG_DATA": "PORT_FW_CFG_DATA",
    "KK_FW_CFG_RAM_SIZE": "FW_CFG_RAM_SIZE",
    "KK_FW_CFG_NB_CPUS": "FW_CFG_NB_CPUS",
    "KK_IO_STORM_PORT": "IO_STORM_PORT",
    "KK_MMIO_STORM_ADDR": "MMIO_STORM_ADDR",
    "KK_LAPIC_BASE": "LAPIC_BASE",
    "KK_AP_TRAMPOLINE_ADDR": "AP_TRAMPOLINE_ADDR",
    "KK_UNMAPPED_ADDR": "UNMAPPED_ADDR",
    "KK_FAULT_EXIT_CODE": "FAULT_EXIT_CODE",
    "KK_MAX_CPUS": "MAX_CPUS",
    "KK_IOAPIC_BASE": "IOAPIC_BASE",
    "KK_IDT_VECTORS": "IDT_VECTORS",
    "KK_IRQ_FIRST": "IRQ_FIRST",
    "KK_SPURIOUS_VECTOR": "SPURIOUS_VECTOR",
}


def test_python_constants_mirror_the_c_header() -> None:
    text = (guests.guest_source_dir() / "kvmkit_guest.h").read_text()
    defines = {
        m.group(1): int(m.group(2), 0)
        for m in re.finditer(r"^#define (KK_\w+) (0x[0-9a-fA-F]+|\d+)U?L?$", text, re.M)
    }
    assert set(HEADER_TO_PYTHON) <= set(defines)
    for c_name, py_name in HEADER_TO_PYTHON.items():
        assert getattr(guests, py_name) == defines[c_name], c_name


@pytest.mark.parametrize("source", sorted(p.name for p in guests.guest_source_dir().glob("*.[cS]")))
def test_sources_compile_without_warnings(source: str, tmp_path: Path) -> None:
    src = guests.guest_source_dir()
    proc = subprocess.run(
        ["gcc", *guests._CFLAGS, "-Werror", f"-I{src}", "-c", str(src / source), "-o",
         str(tmp_path / "out.o")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_command_line_entry_builds_every_guest(cache: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kvmkit.guests"],
        cwd=REPO,
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [line.split("\t") for line in proc.stdout.splitlines()]
    assert [name for name, _ in lines] == list(guests.GUEST_NAMES)
    assert all(Path(path).is_file() and Path(path).is_relative_to(cache) for _, path in lines)


def test_command_line_entry_reports_a_build_error_in_one_line(cache: Path, sources: Path) -> None:
    (sources / "hello.c").write_text("this is not C\n")
    proc = subprocess.run(
        [sys.executable, "-m", "kvmkit.guests"],
        cwd=REPO,
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.startswith("kvmkit.guests: error: compiling hello.c for guest 'hello'")
    assert "Traceback" not in proc.stderr
