"""Guests kvmkit has never seen: an ELF64 written to the runner's conventions, and a
multiboot kernel written for QEMU's -kernel (8250 console, fw_cfg, exit port).  Both are
built here from tests/runner/data with the system gcc, and the multiboot one also boots
under QEMU with the same output."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmkit.guests import qemu_exit_status
from kvmkit.runner.machine import RunResult

DATA = Path(__file__).with_name("data")


def _gcc(tmp: Path, source: str, *flags: str) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    out = tmp / Path(source).stem
    subprocess.run(
        [
            "gcc",
            "-nostdlib",
            "-static",
            "-no-pie",
            "-Wl,--build-id=none",
            *flags,
            "-o",
            str(out),
            str(DATA / source),
        ],
        check=True,
        capture_output=True,
    )
    return out


@pytest.mark.parametrize("cpl", [0, 3])
@pytest.mark.parametrize("python_loop", [False, True])
def test_elf64_written_to_the_conventions(
    tmp_path: Path, run_image: Callable[..., RunResult], cpl: int, python_loop: bool
) -> None:
    image = _gcc(tmp_path, "elf64_hello.S", "-Wl,-Ttext=0x200000")
    r = run_image(image, cpl=cpl, python_loop=python_loop)
    assert (r.image_kind, r.mode) == ("elf64", "long")
    assert (r.reason, r.exit_code, r.process_status) == ("exit", 42, 42)
    assert r.console == "elf64 says hi\n"


def test_multiboot_kernel_written_for_qemu(
    tmp_path: Path, run_image: Callable[..., RunResult]
) -> None:
    image = _gcc(tmp_path, "uart_kernel.S", "-m32", "-Wl,-Ttext=0x100000", "-Wl,-m,elf_i386")
    r = run_image(image, vcpus=2, append="hello world")
    assert (r.image_kind, r.mode) == ("multiboot", "protected")
    assert (r.reason, r.exit_code) == ("exit", 7), r.console
    assert r.console == f"uart kernel: 2 cpus\n{image.name} hello world\n"


def test_the_same_multiboot_kernel_under_qemu(tmp_path: Path, qemu_binary: str) -> None:
    image = _gcc(tmp_path, "uart_kernel.S", "-m32", "-Wl,-Ttext=0x100000", "-Wl,-m,elf_i386")
    serial = tmp_path / "serial.txt"
    proc = subprocess.run(
        [
            qemu_binary,
            "-accel",
            "tcg",
            "-machine",
            "pc",
            "-m",
            "64",
            "-smp",
            "2",
            "-display",
            "none",
            "-nodefaults",
            "-no-user-config",
            "-kernel",
            str(image),
            "-append",
            "hello world",
            "-serial",
            f"file:{serial}",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=4",
        ],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == qemu_exit_status(7), proc.stderr
    assert serial.read_text() == f"uart kernel: 2 cpus\n{image} hello world\n"
