"""The runner as a machine with interrupts: the in-kernel irqchip by default, the bare
machine on request, when a run of halted vCPUs ends, reset requests and --reboot, and an
interrupt-driven serial console fed from stdin."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmkit.runner.context import RunContext
from kvmkit.runner.errors import RunnerError
from kvmkit.runner.machine import RunResult

DATA = Path(__file__).with_name("data")
LOAD = 0x100000
RunImage = Callable[..., RunResult]


def flat(tmp: Path, code: bytes, name: str = "guest.bin") -> Path:
    """A flat long-mode CPL-0 image (load it at LOAD)."""
    path = tmp / name
    path.write_bytes(code)
    return path


def kvmkit(
    *args: str, input: bytes | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "kvmkit", "run", *args],
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
    )


CLI_HLT = bytes([0xFA, 0xF4, 0xEB, 0xFC])  # 1: cli; hlt; jmp 1b
STI_HLT = bytes([0xFB, 0xF4, 0xEB, 0xFC])  # 1: sti; hlt; jmp 1b
SPIN = bytes([0xEB, 0xFE])


@pytest.mark.parametrize("vcpus", [1, 2, 3])
def test_halted_with_interrupts_off_ends_without_a_timeout(
    tmp_path: Path, run_image: RunImage, vcpus: int
) -> None:
    r = run_image(flat(tmp_path, CLI_HLT), load_addr=LOAD, vcpus=vcpus, timeout=None)
    assert r.reason == "halt" and r.process_status == 0
    assert "halted with interrupts off" in r.detail


def test_halted_with_interrupts_on_waits_for_an_interrupt(
    tmp_path: Path, run_image: RunImage
) -> None:
    r = run_image(flat(tmp_path, STI_HLT), load_addr=LOAD, timeout=1.0)
    assert r.reason == "timeout" and r.process_status == 124


def test_the_bare_machine_ends_at_hlt(tmp_path: Path, run_image: RunImage) -> None:
    r = run_image(flat(tmp_path, STI_HLT), load_addr=LOAD, irqchip=False)
    assert (r.reason, r.stats.exits["hlt"]) == ("halt", 1)
    with pytest.raises(RunnerError, match="one vCPU"):
        run_image(flat(tmp_path, STI_HLT), load_addr=LOAD, irqchip=False, vcpus=2)


class ResetPort:
    """A device that resets the machine when written (what 0xcf9 will do)."""

    name = "reset-port"

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def io_out(self, port: int, size: int, data: bytes) -> None:
        self.ctx.request_reset(f"test device at {port:#x}")

    def io_in(self, port: int, size: int) -> int:
        return 0xFF


# mov al,'b'; out 0xe9,al; out 0x6f0,al (with dx); spin
RESET_GUEST = bytes([0xB0, 0x62, 0xE6, 0xE9, 0x66, 0xBA, 0xF0, 0x06, 0xEE]) + SPIN


@pytest.mark.parametrize("python_loop", [False, True])
def test_a_reset_request_ends_the_run_with_its_reason(
    tmp_path: Path, run_image: RunImage, python_loop: bool
) -> None:
    r = run_image(
        flat(tmp_path, RESET_GUEST),
        load_addr=LOAD,
        python_loop=python_loop,
        port_devices=[(0x6F0, 1, ResetPort)],
        timeout=None,
    )
    assert (r.reason, r.process_status, r.console, r.reboots) == ("reset", 0, "b", 0)
    assert "test device at 0x6f0" in r.detail and "--reboot" in r.detail


def test_reboot_restarts_the_guest_from_its_image(tmp_path: Path, run_image: RunImage) -> None:
    r = run_image(
        flat(tmp_path, RESET_GUEST),
        load_addr=LOAD,
        port_devices=[(0x6F0, 1, ResetPort)],
        reboot=True,
        timeout=2.0,
    )
    assert r.reason == "timeout" and r.reboots >= 1
    # each boot ran the image from its start (the last may have timed out before its 'b')
    assert r.console in ("b" * r.reboots, "b" * (r.reboots + 1))


def test_triple_fault_crashes_or_reboots(tmp_path: Path, run_image: RunImage) -> None:
    ud2 = flat(tmp_path, bytes([0xB0, 0x62, 0xE6, 0xE9, 0x0F, 0x0B]))  # 'b'; ud2 (no IDT)
    crash = run_image(ud2, load_addr=LOAD)
    assert (crash.reason, crash.process_status) == ("crash", 125) and "triple fault" in crash.detail
    again = run_image(ud2, load_addr=LOAD, reboot=True, timeout=2.0)
    assert again.reason == "timeout" and again.reboots >= 1
    assert again.console in ("b" * again.reboots, "b" * (again.reboots + 1))


def test_interrupt_driven_serial_console_reads_stdin(tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    image = tmp_path / "uart_irq"
    subprocess.run(
        ["gcc", "-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none",
         "-Wl,-Ttext=0x200000", "-o", str(image), str(DATA / "uart_irq.S")],
        check=True, capture_output=True,
    )  # fmt: skip
    proc = kvmkit(str(image), "--timeout", "60", input=b"hello, 8250 q")
    assert proc.returncode == 7, proc.stderr.decode()
    assert proc.stdout == b"ready\nhello, 8250 "
