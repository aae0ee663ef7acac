"""The same ``compute`` guest image run four ways — kvmkit's runner at CPL 3 and at CPL 0,
QEMU with ``-accel kvm`` and QEMU with ``-accel tcg`` — each as a whole process, timed
with a trivial workload and with a real one.  The difference is the time the workload
itself took under that engine, boot and process start-up excluded.

Engines differ by orders of magnitude (on a PVM host, CPL-0 code is emulated), so one
workload size cannot suit all four: each engine's size grows until its workload takes a
measurable time, and engines are compared by throughput (numbers sieved per second).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvmkit.guests import build_guest, qemu_exit_status
from kvmkit.qemu.config import opt_value

MAX_N = 1_000_000_000


def runner_guest_devices(console: str | Path | None = None) -> list[str]:
    """The QEMU arguments that give a kvmkit guest program what the runner gives it:
    debug console on 0xe9 (to the file ``console``, to ``"stdio"``, or nowhere) and
    exit on 0xf4."""
    if console == "stdio":
        chardev = "stdio,id=con"
    else:
        chardev = f"file,id=con,path={opt_value(console)}" if console else "null,id=con"
    return [
        "-device",
        "isa-debugcon,iobase=0xe9,chardev=con",
        "-chardev",
        chardev,
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=4",
    ]


def qemu_kernel_command(
    image: str | Path,
    *,
    accel: str,
    append: str = "",
    console: str | Path | None = None,
    smp: int = 1,
    memory_mib: int = 64,
) -> list[str]:
    """A QEMU command line that boots a kvmkit guest program the way the runner does:
    multiboot ``-kernel`` and :func:`runner_guest_devices`."""
    cmd = [
        "qemu-system-x86_64",
        "-accel",
        accel,
        "-machine",
        "pc",
        "-m",
        str(memory_mib),
        "-smp",
        str(smp),
        "-display",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-kernel",
        str(image),
        *runner_guest_devices(console),
    ]
    if append:
        cmd += ["-append", append]
    return cmd


@dataclass
class EngineRun:
    """What one engine did with the same guest work: timings, exits and its answer, or
    why it was skipped or failed."""

    engine: str
    kind: str  # what kind of virtualization this is, in a few words
    n: int = 0
    compute_s: float = 0.0
    boot_s: float = 0.0
    exits: int | None = None
    answer: str = ""
    skipped: str | None = None  # this host lacks what the engine needs: why
    failed: str | None = None  # the engine was tried and raised: the error

    @property
    def rate(self) -> float:
        """Numbers sieved per second of workload time."""
        return self.n / self.compute_s if self.compute_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["rate_per_s"] = self.rate
        return d


def _kvm_usable() -> str | None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is missing or not accessible"
    return None


def _timed_lines(
    cmd: list[str], stream: str, timeout: float
) -> tuple[list[tuple[float, str]], str, int]:
    """Run ``cmd``; return each line of its console stream (``stdout`` or ``stderr``) with
    the seconds since start at which it arrived, the other stream, and the exit status."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watched, other = (
        (proc.stdout, proc.stderr) if stream == "stdout" else (proc.stderr, proc.stdout)
    )
    assert watched is not None and other is not None
    lines: list[tuple[float, str]] = []
    try:
        for line in watched:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
            if time.perf_counter() - start > timeout:
                raise subprocess.TimeoutExpired(cmd, timeout)
        rest = other.read()
        status = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return lines, rest, status


def _workload_times(lines: list[tuple[float, str]]) -> tuple[float, float, str]:
    """(boot, workload, answer) from the console: the workload runs between the line
    announcing it and the line with the answer."""
    begin = next((t for t, line in lines if "counting primes" in line), None)
    end = next(
        ((t, line) for t, line in lines if "primes below" in line and "counting" not in line), None
    )
    if begin is None or end is None:
        raise RuntimeError(
            "the guest did not print its start and result lines: "
            + " | ".join(x for _, x in lines)[-300:]
        )
    return begin, end[0] - begin, end[1]


#: (boot seconds, workload seconds, exits or None, the answer line)
Measured = tuple[float, float, int | None, str]


def _runner(image: Path, n: int, cpl: int, timeout: float) -> Measured:
    cmd = [
        sys.executable,
        "-m",
        "kvmkit",
        "run",
        str(image),
        "--append",
        f"n={n} cpl={cpl}",
        "--json",
    ]
    lines, stdout, status = _timed_lines(cmd, "stderr", timeout)
    if status != 0:
        raise RuntimeError(f"kvmkit run exited {status}: {' | '.join(x for _, x in lines)[-300:]}")
    boot, work, answer = _workload_times(lines)
    return boot, work, sum(json.loads(stdout)["exits"].values()), answer


def _qemu(image: Path, n: int, accel: str, timeout: float) -> Measured:
    cmd = qemu_kernel_command(image, accel=accel, append=f"n={n}", console="stdio")
    lines, stderr, status = _timed_lines(cmd, "stdout", timeout)
    if status != qemu_exit_status(0):
        raise RuntimeError(f"QEMU ({accel}) exited {status}: {stderr.strip()[-300:]}")
    boot, work, answer = _workload_times(lines)
    return boot, work, None, answer


def compare_engines(
    *, target_s: float = 0.5, start_n: int = 100_000, timeout: float = 600.0
) -> list[EngineRun]:
    """Run ``compute`` four ways.  Each engine's ``n`` starts at ``start_n`` and grows
    (x10, or x100 while far too fast) until its workload takes ``target_s`` or ``n``
    reaches :data:`MAX_N`.  Engines this host cannot offer come back with ``skipped``
    set to the reason."""
    image = build_guest("compute")
    runs = [
        EngineRun("kvmkit runner, CPL 3", "hardware-assisted: guest user code runs on the CPU"),
        EngineRun(
            "kvmkit runner, CPL 0", "hardware-assisted: guest kernel code (emulated by KVM on PVM)"
        ),
        EngineRun("QEMU -accel kvm", "hardware-assisted, full PC (BIOS, devices) in QEMU"),
        EngineRun("QEMU -accel tcg", "full emulation: QEMU translates every guest instruction"),
    ]
    no_kvm = _kvm_usable()
    no_qemu = None if shutil.which("qemu-system-x86_64") else "qemu-system-x86_64 is not installed"
    for run in runs:
        try:
            if run.engine.startswith("kvmkit"):
                if no_kvm:
                    run.skipped = no_kvm
                    continue
                cpl = 3 if "CPL 3" in run.engine else 0

                measure: Callable[[int], Measured] = functools.partial(
                    _runner, image, cpl=cpl, timeout=timeout
                )
            else:
                accel = run.engine.split()[-1]
                if no_qemu or (accel == "kvm" and no_kvm):
                    run.skipped = no_qemu or no_kvm
                    continue
                measure = functools.partial(_qemu, image, accel=accel, timeout=timeout)
            n = start_n
            while True:
                run.n = n
                run.boot_s, run.compute_s, run.exits, run.answer = measure(n)
                spent = run.compute_s
                if spent >= target_s or n >= MAX_N:
                    break
                n = min(n * (100 if spent < target_s / 50 else 10), MAX_N)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            run.failed = f"{type(exc).__name__}: {exc}"
    return runs


ENGINE_COLUMNS = ["engine", "n", "workload s", "boot s", "exits", "numbers/s", "slowdown"]


def engine_rows(runs: list[EngineRun]) -> list[list[Any]]:
    """Table rows with the slowdown of each engine against the fastest; skipped and
    FAILED engines say so."""
    best = max((r.rate for r in runs if r.skipped is None and r.failed is None), default=0.0)
    rows: list[list[Any]] = []
    for r in runs:
        if r.skipped or r.failed:
            what = f"FAILED: {r.failed}" if r.failed else f"skipped: {r.skipped}"
            rows.append([r.engine, what, "", "", "", "", ""])
            continue
        slow = f"{best / r.rate:.1f}x" if r.rate else "-"
        exits = r.exits if r.exits is not None else "n/a"
        rows.append([r.engine, r.n, r.compute_s, r.boot_s, exits, f"{r.rate:.3g}", slow])
    return rows
