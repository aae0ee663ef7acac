"""The VM-exit table, in the style of kvm-unit-tests' ``x86/vmexit.c``: TSC cycles per
exit for CPUID, a hypercall (the runner's TIME hypercall port 0x501), port I/O and MMIO to
a device in the VMM (QEMU's ``pc-testdev``: port 0xe0, iomem 0xff000000, on both VMMs),
a LAPIC timer interrupt (arm, take it), a self-IPI and an IPI between two vCPUs (CPU 0
sends, CPU 1 sleeping in HLT takes it, CPU 0 waits until it has: kvm-unit-tests' "ipi") —
one guest binary (``csrc/guests/vmexit.c``) on two vCPUs, run four ways in the same run:
kvmkit's C fast path, kvmkit's Python loop, QEMU ``-accel kvm`` (the baseline: every
ratio is to it) and QEMU TCG.

The timer and IPI rows run at CPL 0 (this guest runtime takes interrupts only at CPL 0;
on PVM that code is emulated); CPUID, hypercall, port I/O and MMIO run at CPL 3 (PVM runs
CPL-3 code natively).  The cross-vCPU IPI on a 2-core host shared with other work also
measures the host scheduler: read that row with its spread in mind.

Each way runs three times, interleaved; each figure is the median run's.  Cross-check of
every figure: the host's own clock around the same timed loop, times the
TSC rate KVM reports (``KVM_GET_TSC_KHZ``).  Under kvmkit the guest brackets each loop
with MARK hypercalls, which the runner timestamps; under QEMU it writes one ``@`` to the
debug console before and after the loop, and this process timestamps each ``@`` as it
arrives on QEMU's stdout pipe.  Figure and check agree within 10% or the figure is
printed UNRELIABLE with both.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import Result, Skip
from kvmkit.ui import print_table

TITLE = "VM-exit table (cycles per exit)"

ROWS: dict[str, str] = {
    "cpuid": "CPUID (leaf 0)",
    "hypercall": "hypercall (TIME, port 0x501)",
    "pio": "port I/O to a VMM device (pc-testdev 0xe0)",
    "mmio": "MMIO to a VMM device (pc-testdev 0xff000000)",
    "lapic-timer": "LAPIC timer interrupt (arm, take it)",
    "self-ipi": "self-IPI (send, take it)",
    "ipi": "IPI to the other vCPU (send, it takes it)",
}
#: The order the guest runs them (its CPL-0 rows first).
RUN_ORDER = ("lapic-timer", "self-ipi", "ipi", "cpuid", "hypercall", "pio", "mmio")
#: vCPUs on every way (the IPI row needs two).
VCPUS = 2
#: Rows whose exit returns to the VMM's user space: the goal is <= QEMU-KVM's cost.
TO_VMM = ("hypercall", "pio", "mmio")

FAST = "kvmkit C fast path"
PYTHON = "kvmkit Python loop"
QEMU_KVM = "QEMU -accel kvm"
QEMU_TCG = "QEMU TCG"
CHECK = "host clock around the timed loop x KVM_GET_TSC_KHZ"

_LINE = re.compile(r"^vmexit: (\S+) (\d+) cycles cpl (\d) n (\d+)$", re.M)
_QEMU_TIMEOUT_S = 300.0


@dataclass
class Column:
    """One way's figures: row -> (cycles per op, host-clock ns per op, cpl, n)."""

    way: str
    rows: dict[str, tuple[int, float, int, int]] = field(default_factory=dict)
    #: row -> cycles per op of every run (the figure is their median)
    samples: dict[str, list[int]] = field(default_factory=dict)


def _parse(console: str, host_ns: list[float], way: str) -> Column:
    found = _LINE.findall(console)
    if [name for name, *_ in found] != list(RUN_ORDER):
        raise RuntimeError(f"{way}: the guest did not print every row:\n{console[-800:]}")
    if len(host_ns) != len(found):
        raise RuntimeError(f"{way}: {len(host_ns)} host-timed loops for {len(found)} rows")
    col = Column(way)
    for (name, cycles, cpl, n), ns in zip(found, host_ns, strict=True):
        col.rows[name] = (int(cycles), ns / int(n), int(cpl), int(n))
    return col


def _run_kvmkit(image: Path, append: str, python_loop: bool) -> Column:
    from kvmkit.runner.machine import RunConfig, run_guest

    way = PYTHON if python_loop else FAST
    result = run_guest(
        RunConfig(
            image,
            append=append,
            devices=("pc-testdev",),
            vcpus=VCPUS,
            python_loop=python_loop,
            echo=None,
            timeout=_QEMU_TIMEOUT_S,
        )
    )
    if (result.reason, result.exit_code) != ("exit", 0):
        raise RuntimeError(f"{way}: {result.reason} {result.exit_code}: {result.detail}")
    marks = [m for m in result.stats.marks if m.label in ("row-start", "row-end")]
    starts = [m.t_s for m in marks if m.label == "row-start"]
    ends = [m.t_s for m in marks if m.label == "row-end"]
    host_ns = [(e - s) * 1e9 for s, e in zip(starts, ends, strict=True)]
    return _parse(result.console, host_ns, way)


def _qemu_command(image: Path, accel: str, append: str) -> list[str]:
    from kvmkit.demos.engines import qemu_kernel_command

    cmd = qemu_kernel_command(image, accel=accel, append=append, console="stdio", smp=VCPUS)
    first = cmd.index("-device")
    cmd[first:first] = ["-device", "pc-testdev"]
    return cmd


def _run_qemu(image: Path, accel: str, append: str) -> Column:
    """Run QEMU with the console on a pipe; timestamp every ``@`` as it arrives."""
    way = QEMU_KVM if accel == "kvm" else QEMU_TCG
    cmd = _qemu_command(image, accel, append + " stamps=1")
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    out = bytearray()
    stamps: list[int] = []
    deadline = time.monotonic() + _QEMU_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            chunk = os.read(proc.stdout.fileno(), 65536)
            now = time.monotonic_ns()
            if not chunk:
                break
            stamps += [now] * chunk.count(b"@")
            out += chunk
        else:
            raise RuntimeError(f"{way}: no end within {_QEMU_TIMEOUT_S:.0f} s")
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=30)
    if proc.returncode != 1:  # isa-debug-exit: (0 << 1) | 1
        raise RuntimeError(f"{way}: QEMU exited {proc.returncode}: {err.decode()[-400:]}")
    host_ns = [float(b - a) for a, b in zip(stamps[::2], stamps[1::2], strict=True)]
    return _parse(out.decode(errors="replace").replace("@", ""), host_ns, way)


def _tsc_khz() -> int:
    from kvmkit.kvm import Kvm

    with Kvm() as kvm, kvm.create_vm() as vm:
        khz: int = vm.create_vcpu(0).get_tsc_khz()
    return khz


def _median_column(runs: list[Column]) -> Column:
    """Per row, the run whose cycles are the median (its own host check with it), and
    every run's cycles in ``samples``."""
    out = Column(runs[0].way)
    for row in runs[0].rows:
        ranked = sorted(runs, key=lambda c: c.rows[row][0])
        out.rows[row] = ranked[len(ranked) // 2].rows[row]
        out.samples[row] = [c.rows[row][0] for c in runs]
    return out


def measure(quick: bool) -> tuple[list[Column], int]:
    """Every way, ``repeats`` times interleaved (so load drift hits each alike)."""
    from kvmkit.guests import build_guest

    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise Skip("no usable /dev/kvm")
    if shutil.which("qemu-system-x86_64") is None:
        raise Skip("qemu-system-x86_64 is not installed (the QEMU-KVM baseline needs it)")
    image = build_guest("vmexit")
    append = f"goal={1 << (24 if quick else 26)}"
    ways: list[Callable[[], Column]] = [
        lambda: _run_qemu(image, "kvm", append),
        lambda: _run_kvmkit(image, append, python_loop=False),
        lambda: _run_kvmkit(image, append, python_loop=True),
        lambda: _run_qemu(image, "tcg", append),
    ]
    runs: list[list[Column]] = [[] for _ in ways]
    for _ in range(1 if quick else 3):
        for i, way in enumerate(ways):
            runs[i].append(way())
    return [_median_column(r) for r in runs], _tsc_khz()


def run(quick: bool = False) -> list[Result]:
    columns, tsc_khz = measure(quick)
    base = columns[0]
    results = []
    for col in columns:
        for row, (cycles, host_ns, cpl, n) in col.rows.items():
            baseline = base.rows[row][0]
            results.append(
                Result(
                    TITLE,
                    f"{ROWS[row]} [CPL {cpl}]: {col.way}",
                    float(cycles),
                    "cycles/exit",
                    QEMU_KVM if col.way != QEMU_KVM else None,
                    float(baseline) if col.way != QEMU_KVM else None,
                    target="<= 1.0x" if row in TO_VMM and col.way in (FAST, PYTHON) else None,
                    check=host_ns * tsc_khz / 1e6,
                    check_method=CHECK,
                    extra={
                        "n": n,
                        "cpl": cpl,
                        "host_ns_per_exit": host_ns,
                        "tsc_khz": tsc_khz,
                        "cycles_runs": col.samples.get(row, []),
                    },
                )
            )
    _print_matrix(columns)
    return results


def _print_matrix(columns: list[Column]) -> None:
    """The kvm-unit-tests shape: one line per exit, one column per way, ratio to QEMU-KVM."""
    base = columns[0]
    rows = []
    for row, label in ROWS.items():
        cells: list[str] = [label, str(base.rows[row][2])]
        for col in columns:
            cycles = col.rows[row][0]
            ratio = cycles / base.rows[row][0] if base.rows[row][0] else float("nan")
            cells.append(f"{cycles:,}" if col is base else f"{cycles:,} ({ratio:.2f}x)")
        rows.append(cells)
    print_table(
        ["exit", "CPL", *(f"{c.way}" for c in columns)],
        rows,
        title="VM-exit table: TSC cycles per exit (ratio to QEMU -accel kvm)",
    )


if __name__ == "__main__":
    from benchmarks.report import print_results

    print_results(run(quick=True))
