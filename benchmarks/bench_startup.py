"""Whole-process start-up: ``kvmkit run hello`` against ``qemu-system-x86_64 -accel kvm``
booting the same multiboot image to the same exit port, each from exec to exit.
The QEMU run is the baseline; a ratio below 1 means kvmkit starts faster."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time

from benchmarks.common import Result
from kvmkit.demos.engines import qemu_kernel_command
from kvmkit.guests import build_guest, qemu_exit_status

TITLE = "Start-up (whole process)"


def _time(cmd: list[str], expect_status: int, timeout: float = 120.0) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
    elapsed = time.perf_counter() - start
    if proc.returncode != expect_status:
        raise RuntimeError(
            f"{cmd[0]} exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-300:]}"
        )
    return elapsed


def run(quick: bool = False) -> list[Result]:
    image = str(build_guest("hello"))
    repeats = 3 if quick else 5
    kvmkit_cmd = [sys.executable, "-m", "kvmkit", "run", image]
    ways = {"kvmkit run hello": (kvmkit_cmd, 0)}
    if shutil.which("qemu-system-x86_64"):
        ways["qemu-system-x86_64 -accel kvm"] = (
            qemu_kernel_command(image, accel="kvm"),
            qemu_exit_status(0),
        )
    samples: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, (cmd, status) in ways.items():
            samples[name].append(_time(cmd, status))
    figures = {name: statistics.median(v) for name, v in samples.items()}
    base_name = "qemu-system-x86_64 -accel kvm"
    base = figures.get(base_name)
    return [
        Result(
            TITLE,
            name,
            value * 1e3,
            "ms",
            base_name if base else None,
            base * 1e3 if base else None,
            target="< 1x" if name.startswith("kvmkit") else None,
        )
        for name, value in figures.items()
    ]


if __name__ == "__main__":
    from benchmarks.report import print_results

    print_results(run())
