"""One image, two VMMs: each bundled guest prints the same console text under kvmkit's
runner and under QEMU TCG (-kernel multiboot, isa-debugcon, isa-debug-exit)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmkit.demos.engines import qemu_kernel_command
from kvmkit.guests import qemu_exit_status
from kvmkit.runner.machine import RunResult

CASES = [
    ("hello", "", 1),
    ("compute", "n=100000", 1),
    ("compute", "n=3000 cpl=0", 1),
    ("io-storm", "n=50", 1),
    ("mmio-storm", "n=50", 1),
    ("smp", "", 2),
    # the pc platform: interrupt controllers and timers, RTC, ACPI tables, PCI
    ("timers", "", 1),
    ("timers", "", 2),
    ("timers", "", 4),
    ("rtc", "", 1),
    ("acpi", "", 1),
    ("acpi", "", 3),
    ("pci", "", 1),
    ("pci", "testdev=1", 1),
    ("testdev", "", 1),
    # snapshot/migration's guest: a periodic LAPIC timer taken at CPL 3, memory dirtied
    ("dirty", "ticks=20", 1),
    ("dirty", "ticks=20 cpl=0", 2),
]
#: Optional devices a case needs on both VMMs (QEMU's -device, the runner's devices=).
DEVICES = {("pci", "testdev=1"): ("pci-testdev",), ("testdev", ""): ("pc-testdev",)}
_RTC_TIME = re.compile(r"^rtc: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d$", re.M)


def _stable(console: str, guest: str) -> str:
    if guest == "smp":  # which CPU comes up first varies from run to run on both VMMs
        return "\n".join(sorted(console.splitlines()))
    if guest == "rtc":  # the clock moved on between the two runs (test_platform_guests checks it)
        return _RTC_TIME.sub("rtc: <date and time>", console)
    return console


@pytest.mark.parametrize(("guest", "args", "cpus"), CASES)
def test_runner_and_qemu_print_the_same(
    guest: str,
    args: str,
    cpus: int,
    guest_image: Callable[[str], Path],
    run_image: Callable[..., RunResult],
    qemu_binary: str,
    tmp_path: Path,
) -> None:
    image = guest_image(guest)
    devices = DEVICES.get((guest, args), ())
    ours = run_image(image, append=args, vcpus=cpus, devices=devices)
    assert (ours.reason, ours.exit_code) == ("exit", 0), ours.console
    console = tmp_path / "console.txt"
    cmd = qemu_kernel_command(image, accel="tcg", append=args, console=console, smp=cpus)
    first = cmd.index("-device")  # before isa-debugcon: the console keeps 0xe9 (pc-testdev)
    for device in reversed(devices):
        cmd[first:first] = ["-device", device]
    proc = subprocess.run(cmd, capture_output=True, timeout=120)
    assert proc.returncode == qemu_exit_status(0), proc.stderr
    theirs = console.read_text()
    # QEMU hands the guest "<path> args", the runner "<name> args": both guests drop the first word
    assert _stable(ours.console, guest) == _stable(theirs, guest)
