"""The cost of one VM exit, measured so that it survives a sceptical reviewer.

One hand-built long-mode guest per case loops ``n`` times over one exiting instruction
(an ``out`` from CPL 3 or CPL 0, an MMIO write, a ``HLT``), and writes the mark
hypercall port just before and just after the loop.  Every way of running it — the raw C
``KVM_RUN`` loop (``benchmarks/csrc/raw_kvm_loop.c``, the baseline), kvmkit's C fast path,
kvmkit's Python loop, and any extra way a caller names (the benchmarks add the plainest
Python loop) — takes the time at those two marks, so the figure covers the exits and
nothing else: VM creation, the fast path's port table and counter merge, thread start and
statistics stay outside on every side.

Each figure is cross-checked by a second, independent method: the same guest with ``N1``
and ``N2`` exits run as whole processes, timed from outside, ``(T(N2) - T(N1)) / (N2 -
N1)``.  The two must agree within :data:`AGREEMENT`, or the figure is marked unreliable
and both values are shown.

Run one measurement as its own process (what the cross-check does)::

    python -m kvmkit.demos.exits --case "port I/O, CPL 3" --way "kvmkit Python loop" -n 5000
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Relative disagreement above which a figure is printed as unreliable.
AGREEMENT = 0.10

CODE_AT = 0x100000
MARKS_AT = 0x3000  # two mark argument structs and their labels
MEM_SIZE = 8 << 20
STACK_TOP = 0x80000
TSS_ADDR = 0xFFFBD000
CONSOLE_PORT = 0xE9
EXIT_PORT = 0xF4
MARK_PORT = 0x504  # HYPERCALL_BASE + HC_MARK (kvmkit.runner.devices.hypercalls)
MMIO_ADDR = 0xD0000000

#: case name -> (loop body, CPL)
CASES: dict[str, tuple[bytes, int]] = {
    "port I/O, CPL 3": (bytes([0xB0, 0x2E, 0xE6, CONSOLE_PORT]), 3),  # mov al,'.'; out 0xe9,al
    "port I/O, CPL 0": (bytes([0xB0, 0x2E, 0xE6, CONSOLE_PORT]), 0),
    # mov ebx, MMIO_ADDR; mov [rbx], eax
    "MMIO write, CPL 0": (bytes([0xBB]) + MMIO_ADDR.to_bytes(4, "little") + b"\x89\x03", 0),
    "HLT, CPL 0": (bytes([0xF4]), 0),
}

RAW_C = "raw C KVM_RUN loop"
FAST_PATH = "kvmkit C fast path"
PYTHON_LOOP = "kvmkit Python loop"
WAYS = (RAW_C, FAST_PATH, PYTHON_LOOP)

#: The raw C loop's source: it lives with the benchmarks, in a kvmkit checkout.
RAW_LOOP_SOURCE = Path(__file__).resolve().parents[2] / "benchmarks" / "csrc" / "raw_kvm_loop.c"


class Unavailable(Exception):
    """Raised when this host lacks something a way needs (a compiler, the raw loop's source)."""


def _mark(arg_gpa: int) -> bytes:
    """Machine code for ``mov eax, arg_gpa; mov dx, MARK_PORT; out dx, eax``."""
    return (
        b"\xb8" + arg_gpa.to_bytes(4, "little") + b"\x66\xba" + MARK_PORT.to_bytes(2, "little")
    ) + b"\xef"


def guest_code(body: bytes, n: int) -> bytes:
    """mark; mov ecx, n; 1: <body>; dec ecx; jnz 1b; mark; xor eax,eax; out 0xf4,al; spin.
    ``n`` must be 1..2**32-1; ``body`` must not touch ecx."""
    if not 0 < n < 1 << 32:
        raise ValueError(f"n={n}: give 1 to 2**32-1 exits")
    back = -(len(body) + 4) & 0xFF
    return (
        _mark(MARKS_AT)
        + b"\xb9"
        + n.to_bytes(4, "little")
        + body
        + bytes([0xFF, 0xC9, 0x75, back])
        + _mark(MARKS_AT + 16)
        + bytes([0x31, 0xC0, 0xE6, EXIT_PORT, 0xEB, 0xFE])
    )


def _mark_args() -> bytes:
    """Two ``{u64 label_gpa; u64 label_len}`` structs, then their labels."""
    start, end = b"exits-start", b"exits-end"
    labels_at = MARKS_AT + 32
    return (
        labels_at.to_bytes(8, "little")
        + len(start).to_bytes(8, "little")
        + (labels_at + 16).to_bytes(8, "little")
        + len(end).to_bytes(8, "little")
        + start.ljust(16, b"\0")
        + end
    )


@contextlib.contextmanager
def prepared_vcpu(case: str, n: int) -> Iterator[tuple[Any, Any]]:
    """A fresh VM with the exit guest for ``case`` loaded and its vCPU ready to run
    ``n`` exits; yields ``(vm, vcpu)``."""
    from kvmkit.kvm import Kvm
    from kvmkit.kvm.modes import setup_long_mode

    body, cpl = CASES[case]
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.add_memory(0, MEM_SIZE)
        vm.set_tss_addr(TSS_ADDR)
        vm.write(CODE_AT, guest_code(body, n))
        vm.write(MARKS_AT, _mark_args())
        cpu = vm.create_vcpu(0)
        setup_long_mode(cpu, entry=CODE_AT, stack=STACK_TOP, cpl=cpl)
        yield vm, cpu


def build_raw_loop(workdir: Path) -> Path:
    """Compile the raw C loop into ``workdir``; return the shared library's path."""
    if not RAW_LOOP_SOURCE.exists():
        raise Unavailable(f"the raw C loop's source is not here ({RAW_LOOP_SOURCE})")
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise Unavailable("no C compiler (gcc) for the raw C loop")
    lib = workdir / "raw_kvm_loop.so"
    subprocess.run(
        [cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(RAW_LOOP_SOURCE)],
        check=True,
        capture_output=True,
    )
    return lib


def _run_raw(vm: Any, cpu: Any, raw_lib: Path) -> list[int]:
    from kvmkit._ffi import ffi

    fn = ctypes.CDLL(str(raw_lib)).raw_kvm_loop
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    fn.argtypes += [ctypes.POINTER(ctypes.c_uint64), ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    fn.restype = ctypes.c_long
    marks = (ctypes.c_uint64 * 2)()
    nmarks = ctypes.c_int(0)
    run_addr = int(ffi.cast("uintptr_t", cpu.kvm_run))
    if fn(cpu.fd, run_addr, EXIT_PORT, MARK_PORT, marks, 2, ctypes.byref(nmarks)) < 0:
        raise RuntimeError("the raw C loop stopped on a failed KVM_RUN or an unexpected exit")
    return list(marks[: nmarks.value])


def _run_kvmkit(vm: Any, cpu: Any, python: bool) -> list[int]:
    from kvmkit.runner.context import RunContext
    from kvmkit.runner.loop import VcpuLoop
    from kvmkit.runner.machine import build_bus

    ctx = RunContext(vm, echo=None)
    bus = build_bus(ctx, mem_size=MEM_SIZE, vcpus=1)
    loop = VcpuLoop(cpu, bus, ctx, threading.Event(), halt_ends_run=False)
    outcome = loop.run_python() if python else loop.run_fast()
    if outcome.kind != "exit":
        raise RuntimeError(
            f"the guest ended with {outcome.kind}: {outcome.detail or outcome.error}"
        )
    return [ctx.start_ns + round(m.t_s * 1e9) for m in ctx.marks]


def _load_way(spec: str) -> Callable[..., list[int]]:
    module, _, name = spec.partition(":")
    fn: Callable[..., list[int]] = getattr(importlib.import_module(module), name)
    return fn


def run_once(case: str, way: str, n: int, *, raw_lib: Path | None = None, spec: str = "") -> float:
    """Seconds per exit between the guest's two marks, for one run of ``n`` exits in
    this process.  ``spec`` (``module:function``) names an extra way."""
    with prepared_vcpu(case, n) as (vm, cpu):
        if way == RAW_C:
            if raw_lib is None:
                raise ValueError("the raw C way needs raw_lib")
            marks = _run_raw(vm, cpu, raw_lib)
        elif way in (FAST_PATH, PYTHON_LOOP):
            marks = _run_kvmkit(vm, cpu, python=way == PYTHON_LOOP)
        elif spec:
            marks = _load_way(spec)(
                vm, cpu, exit_port=EXIT_PORT, mark_port=MARK_PORT, console_port=CONSOLE_PORT
            )
        else:
            raise ValueError(f"unknown way {way!r} and no module:function for it")
    if len(marks) != 2:
        raise RuntimeError(f"{way}: the guest's two marks were not both seen ({len(marks)})")
    # between the marks: n exits of the loop, then the second mark's own exit
    return (marks[1] - marks[0]) / 1e9 / (n + 1)


def _worker_command(case: str, way: str, n: int, raw_lib: Path | None, spec: str) -> list[str]:
    cmd = [sys.executable, "-m", "kvmkit.demos.exits", "--case", case, "--way", way, "-n", str(n)]
    if raw_lib is not None:
        cmd += ["--raw-lib", str(raw_lib)]
    if spec:
        cmd += ["--spec", spec]
    return cmd


def run_process(
    case: str, way: str, n: int, *, raw_lib: Path | None = None, spec: str = ""
) -> tuple[float, float]:
    """Run one measurement as a whole process; return (its wall-clock seconds, timed from
    here, and the per-exit seconds it measured between the marks)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = _worker_command(case, way, n, raw_lib, spec)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(
            f"{way}, {case}, n={n}: the worker exited {proc.returncode}: {proc.stderr.strip()[-400:]}"
        )
    return elapsed, float(proc.stdout.split()[-1])


@dataclass
class ExitFigure:
    """One case under one way: the per-exit time between the guest's marks (median of
    the N2 runs) and the whole-process cross-check ``(T(N2) - T(N1)) / (N2 - N1)``."""

    case: str
    way: str
    n1: int
    n2: int
    marks_us: float
    whole_process_us: float
    samples: dict[str, list[float]] = field(default_factory=dict)

    @property
    def disagreement(self) -> float:
        return abs(self.marks_us - self.whole_process_us) / max(
            self.whole_process_us, self.marks_us, 1e-12
        )

    @property
    def reliable(self) -> bool:
        return self.whole_process_us > 0 and self.disagreement <= AGREEMENT

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["reliable"] = self.reliable
        data["disagreement"] = self.disagreement
        return data


@dataclass
class ExitTable:
    """Every figure of one measurement, and the ways that could not run here (way ->
    reason)."""

    figures: list[ExitFigure]
    unavailable: dict[str, str] = field(default_factory=dict)

    def baseline(self, case: str, way: str = RAW_C) -> ExitFigure | None:
        return next((f for f in self.figures if f.case == case and f.way == way), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "figures": [f.to_json() for f in self.figures],
            "unavailable": self.unavailable,
        }


def measure(
    cases: Sequence[str] = tuple(CASES),
    *,
    n1: int = 5000,
    n2: int = 55000,
    repeats: int = 3,
    extra_ways: dict[str, str] | None = None,
    workdir: Path,
    on_progress: Callable[[str], None] | None = None,
) -> ExitTable:
    """Measure every case under every way (the three of :data:`WAYS` and ``extra_ways``,
    name -> ``module:function``), each as whole processes of ``n1`` and ``n2`` exits,
    ``repeats`` times interleaved so drift in load hits every way alike.  ``workdir``
    receives the compiled raw loop; the caller removes it."""
    if not 0 < n1 < n2:
        raise ValueError(f"need 0 < n1 < n2 (got {n1}, {n2})")
    table = ExitTable([])
    ways: dict[str, str] = {w: "" for w in WAYS} | dict(extra_ways or {})
    raw_lib: Path | None = None
    try:
        raw_lib = build_raw_loop(workdir)
    except Unavailable as exc:
        table.unavailable[RAW_C] = str(exc)
        del ways[RAW_C]
    for case in cases:
        whole: dict[tuple[str, int], list[float]] = {(w, n): [] for w in ways for n in (n1, n2)}
        marks: dict[str, list[float]] = {w: [] for w in ways}
        for _ in range(repeats):
            for way, spec in ways.items():
                if on_progress is not None:
                    on_progress(f"{case}: {way}")
                for n in (n1, n2):
                    elapsed, per_exit = run_process(case, way, n, raw_lib=raw_lib, spec=spec)
                    whole[way, n].append(elapsed)
                    if n == n2:
                        marks[way].append(per_exit)
        for way in ways:
            t1, t2 = statistics.median(whole[way, n1]), statistics.median(whole[way, n2])
            table.figures.append(
                ExitFigure(
                    case,
                    way,
                    n1,
                    n2,
                    statistics.median(marks[way]) * 1e6,
                    (t2 - t1) / (n2 - n1) * 1e6,
                    {
                        "marks_us": [s * 1e6 for s in marks[way]],
                        "whole_n1_s": whole[way, n1],
                        "whole_n2_s": whole[way, n2],
                    },
                )
            )
    return table


def figure_text(f: ExitFigure) -> str:
    """The figure as printed: the marks value, or UNRELIABLE with both values."""
    if f.reliable:
        return f"{f.marks_us:.2f}"
    return f"UNRELIABLE: marks {f.marks_us:.2f}, whole process {f.whole_process_us:.2f}"


def table_rows(table: ExitTable) -> list[list[Any]]:
    """Rows of (case, way, µs per exit, ratio to raw C, cross-check) for a rich table."""
    rows: list[list[Any]] = []
    for f in table.figures:
        base = table.baseline(f.case)
        ratio = f"{f.marks_us / base.marks_us:.2f}x" if base and base.marks_us else "-"
        check = f"{f.whole_process_us:.2f} ({f.disagreement:.0%} apart)"
        rows.append([f.case, f.way, figure_text(f), ratio, check])
    for way, reason in table.unavailable.items():
        rows.append(["every case", way, f"skipped: {reason}", "-", "-"])
    return rows


TABLE_COLUMNS = ["exit", "way", "µs/exit (marks)", "vs raw C", "whole-process µs/exit"]


def main(argv: Sequence[str] | None = None) -> int:
    """The worker: one run as its own process; prints the per-exit seconds."""
    parser = argparse.ArgumentParser(prog="python -m kvmkit.demos.exits")
    parser.add_argument("--case", required=True, choices=list(CASES))
    parser.add_argument("--way", required=True)
    parser.add_argument("-n", type=int, required=True)
    parser.add_argument("--raw-lib", type=Path)
    parser.add_argument("--spec", default="", help="module:function of an extra way")
    args = parser.parse_args(argv)
    per_exit = run_once(args.case, args.way, args.n, raw_lib=args.raw_lib, spec=args.spec)
    print(f"{per_exit:.12g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
