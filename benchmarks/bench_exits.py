"""Per-exit cost of a port-I/O exit from CPL 3 and CPL 0, an MMIO write and a HLT, on one
hand-built guest (:mod:`kvmkit.demos.exits`), run four ways in the same run:

- ``raw C KVM_RUN loop`` (benchmarks/csrc/raw_kvm_loop.c): the baseline of the C lines;
- ``kvmkit C fast path``: the runner's C loop;
- ``plain Python loop`` (benchmarks/plain_python_loop.py: fcntl.ioctl, mmap, struct, a
  dict of handlers): the baseline of kvmkit's Python loop;
- ``kvmkit Python loop``: the runner's Python loop.

Every figure is the time between the guest's own two marks divided by the exits between
them (set-up excluded on every side), cross-checked by whole processes of N1 and N2 exits:
``(T(N2) - T(N1)) / (N2 - N1)``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from benchmarks.common import Result, Skip
from kvmkit.demos import exits

TITLE = "VM exit cost"
PLAIN = "plain Python loop"
PLAIN_SPEC = "benchmarks.plain_python_loop:run_plain"
CHECK = "whole processes, N2 - N1 exits"

#: way -> (its baseline way, target)
BASELINES = {
    exits.RAW_C: (exits.RAW_C, None),
    exits.FAST_PATH: (exits.RAW_C, "<= 1.05x"),
    PLAIN: (exits.RAW_C, None),
    exits.PYTHON_LOOP: (PLAIN, "<= 1.0x"),
}


def run(quick: bool = False) -> list[Result]:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise Skip("no usable /dev/kvm")
    n1, n2 = (2000, 12000) if quick else (5000, 55000)
    with tempfile.TemporaryDirectory(prefix="kvmkit-bench-exits-") as tmp:
        table = exits.measure(
            n1=n1,
            n2=n2,
            repeats=2 if quick else 3,
            extra_ways={PLAIN: PLAIN_SPEC},
            workdir=Path(tmp),
        )
    if exits.RAW_C in table.unavailable:
        raise Skip(table.unavailable[exits.RAW_C])
    results = []
    for f in table.figures:
        base_way, target = BASELINES[f.way]
        base = table.baseline(f.case, base_way)
        results.append(
            Result(
                TITLE,
                f"{f.case}: {f.way}",
                f.marks_us,
                "µs/exit",
                f"{base_way}" if base_way != f.way else None,
                base.marks_us if base is not None and base_way != f.way else None,
                target=target,
                check=f.whole_process_us,
                check_method=CHECK,
                extra={"n1": f.n1, "n2": f.n2, **f.samples},
            )
        )
    return results


if __name__ == "__main__":
    from benchmarks.report import print_results

    print_results(run(quick=True))
