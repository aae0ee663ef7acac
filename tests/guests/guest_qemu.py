"""Boot a kvmkit guest image under QEMU TCG and collect what it prints.

Each boot is ``qemu-system-x86_64 -accel tcg -kernel IMAGE`` with ``isa-debugcon`` on port
0xe9 (written to a file) and ``isa-debug-exit`` on port 0xf4, bounded by a timeout after
which the QEMU process (ours, by PID) is killed and the test fails.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

BOOT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Boot:
    """How one QEMU run ended: its exit status and the debug console's bytes as text."""

    status: int
    console: str
    stderr: str


BootFn = Callable[..., Boot]


def boot_under_qemu(
    qemu: str,
    image: Path,
    workdir: Path,
    *,
    append: str = "",
    smp: int = 1,
    devices: tuple[str, ...] = (),
    timeout: float = BOOT_TIMEOUT_S,
) -> Boot:
    """Boot ``image`` (with QEMU's ``-device`` for each of ``devices``) and wait for QEMU to
    exit; fail the test if it has not within ``timeout``."""
    console = workdir / f"console-{image.stem}-{smp}.txt"
    console.unlink(missing_ok=True)
    cmd = [
        qemu,
        "-accel", "tcg",
        "-machine", "pc",
        "-display", "none",
        "-nodefaults",
        "-no-reboot",  # a triple fault ends the run instead of rebooting forever
        "-kernel", str(image),
        "-append", append,
        "-chardev", f"file,id=con,path={console}",
        "-device", "isa-debugcon,iobase=0xe9,chardev=con",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
        "-smp", str(smp),
    ]  # fmt: skip
    first = cmd.index("-device")  # before isa-debugcon: the console keeps 0xe9 (pc-testdev)
    for device in reversed(devices):
        cmd[first:first] = ["-device", device]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # our own child, by PID
        _, stderr = proc.communicate()
        text = console.read_text(errors="replace") if console.exists() else ""
        pytest.fail(f"{image.name} {append!r} still running after {timeout} s; console: {text!r}")
    text = console.read_text(errors="replace") if console.exists() else ""
    return Boot(status=proc.returncode, console=text, stderr=stderr)
