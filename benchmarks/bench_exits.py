"""Per-exit cost: a port-I/O exit from CPL 3 and from CPL 0, an MMIO exit and a HLT exit,
each timed three ways in the same run on the same VM image:

- ``raw C``: a bare ``KVM_RUN`` loop in C (benchmarks/csrc/raw_kvm_loop.c, compiled here),
  the baseline;
- ``kvmkit C fast path``: the runner's C loop (handles console and exit ports in C);
- ``kvmkit Python loop``: every exit decoded and dispatched in Python.

Each figure is the median of several runs of N exits; ratios are to raw C.
"""

from __future__ import annotations

import ctypes
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import Result
from kvmkit.kvm import Kvm
from kvmkit.kvm.modes import setup_long_mode
from kvmkit.runner.context import RunContext
from kvmkit.runner.loop import VcpuLoop
from kvmkit.runner.machine import build_bus

TITLE = "VM exit cost"
CODE_AT = 0x100000
EXIT_PORT = 0xF4
MMIO_ADDR = 0xD0000000


def _loop(body: bytes, n: int) -> bytes:
    """mov ecx, n; 1: <body>; dec ecx; jnz 1b; xor eax, eax; out 0xf4, al; (spin)"""
    back = -(len(body) + 4) & 0xFF
    return (
        bytes([0xB9])
        + n.to_bytes(4, "little")
        + body
        + bytes([0xFF, 0xC9, 0x75, back])
        + bytes([0x31, 0xC0, 0xE6, EXIT_PORT, 0xEB, 0xFE])
    )


CASES: dict[str, tuple[bytes, int]] = {
    # name: (loop body, CPL)
    "port I/O, CPL 3": (bytes([0xB0, 0x2E, 0xE6, 0xE9]), 3),  # mov al,'.'; out 0xe9,al
    "port I/O, CPL 0": (bytes([0xB0, 0x2E, 0xE6, 0xE9]), 0),
    "MMIO write": (
        bytes([0xBB]) + MMIO_ADDR.to_bytes(4, "little") + bytes([0x89, 0x03]),
        0,
    ),  # mov ebx,addr; mov [rbx],eax
    "HLT": (bytes([0xF4]), 0),
}


def _build_raw_loop(workdir: Path) -> Callable[[int, int, int], int]:
    src = Path(__file__).with_name("csrc") / "raw_kvm_loop.c"
    lib = workdir / "raw_kvm_loop.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    fn = ctypes.CDLL(str(lib)).raw_kvm_loop
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    fn.restype = ctypes.c_long
    return fn  # type: ignore[no-any-return]


def _time_once(
    kvm: Kvm, body: bytes, cpl: int, n: int, how: str, raw: Callable[[int, int, int], int]
) -> float:
    """Seconds per exit for one run of ``n`` loop iterations."""
    with kvm.create_vm() as vm:
        vm.add_memory(0, 8 << 20)
        vm.set_tss_addr(0xFFFBD000)
        vm.write(CODE_AT, _loop(body, n))
        cpu = vm.create_vcpu(0)
        setup_long_mode(cpu, entry=CODE_AT, stack=0x80000, cpl=cpl)
        if how == "raw C":
            from kvmkit._ffi import ffi

            run_addr = int(ffi.cast("uintptr_t", cpu.kvm_run))
            start = time.perf_counter()
            exits = raw(cpu.fd, run_addr, EXIT_PORT)
            elapsed = time.perf_counter() - start
            if exits < n:
                raise RuntimeError(f"raw loop stopped after {exits} exits")
            return elapsed / exits
        ctx = RunContext(vm, echo=None)
        loop = VcpuLoop(
            cpu,
            build_bus(ctx, mem_size=8 << 20, vcpus=1),
            ctx,
            threading.Event(),
            halt_ends_run=False,
        )
        start = time.perf_counter()
        outcome = loop.run_fast() if how == "kvmkit C fast path" else loop.run_python()
        elapsed = time.perf_counter() - start
        if outcome.kind != "exit":
            raise RuntimeError(f"{how}: guest ended with {outcome}")
        return elapsed / loop.stats.kvm_run_calls


def run(quick: bool = False) -> list[Result]:
    results: list[Result] = []
    repeats = 3 if quick else 5
    with tempfile.TemporaryDirectory(prefix="kvmkit-bench-") as tmp, Kvm() as kvm:
        raw = _build_raw_loop(Path(tmp))
        for case, (body, cpl) in CASES.items():
            n = 2000 if quick else 20000
            ways = ("raw C", "kvmkit C fast path", "kvmkit Python loop")
            samples: dict[str, list[float]] = {how: [] for how in ways}
            for _ in range(repeats):  # interleaved, so drift in machine load hits all three alike
                for how in ways:
                    samples[how].append(_time_once(kvm, body, cpl, n, how, raw))
            figures = {how: statistics.median(values) for how, values in samples.items()}
            base = figures["raw C"]
            for how, value in figures.items():
                target = None
                if how == "kvmkit C fast path" and case.startswith("port"):
                    target = "<= 1.05x"
                elif how == "kvmkit Python loop":
                    target = "<= 1.3x"
                results.append(
                    Result(
                        TITLE,
                        f"{case}: {how}",
                        value * 1e6,
                        "µs/exit",
                        "raw C",
                        base * 1e6,
                        target=target,
                    )
                )
    return results


if __name__ == "__main__":
    from benchmarks.report import print_results

    print_results(run())
