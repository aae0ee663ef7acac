"""Snapshot restore and live migration of kvmkit's own minimal VMs (the ``dirty`` guest).

Restore latency, for 128 MiB and 1 GiB guests, lazy (``MAP_PRIVATE``) and eager (all
memory read into anonymous memory and its SHA-256 checked first: it grows with RAM by
design, so it has no goal and is shown for comparison):

- *to first instruction*: from the start of ``Machine.restore`` to the first MARK
  hypercall the guest makes after it (the guest issues one every ~40 µs while it waits
  for its timer, ``mark=1``), in this process; baseline: a cold boot of the same guest
  from its image to its ``main`` mark, in this run.  Goal (the issue, after
  Firecracker): <= 5 ms for 128 MiB, 1 GiB within 1.2x of 128 MiB.
- *whole process*: ``kvmkit restore DIR --timeout 0.001`` from spawn to exit; baseline:
  ``kvmkit run dirty --timeout 0.001`` (a process that boots the same guest).

Migration (``Machine.migrate`` to a destination ``kvmkit run --incoming`` in another
process, over a unix socket), total time and downtime against RAM size (128 MiB, 1 GiB, guest
nearly idle, downtime target 5 ms) and dirty rate (128 MiB, 256/2048/8192 words per
10 ms tick, target 50 ms, the default).  Baseline for each: QEMU migrating the same
guest with the same arguments and RAM over a unix socket with ``downtime-limit`` set to
the same target, in this run (:mod:`benchmarks.qemu_guest_migration`; under TCG, as
here, QEMU warns that a short limit has corrupted dirtying Linux guests — the figures
are timings only).  Goal: an idle 128 MiB guest migrates with <= 5 ms downtime.

Every figure is the median of N runs and is cross-checked by the median of a second,
independent batch of N runs (total times also by the host clock around ``migrate``).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from benchmarks.common import Result, Skip
from benchmarks.qemu_guest_migration import qemu_migrations
from benchmarks.report import print_results

BENCH = "snapshot"
TITLE = "Snapshot restore and live migration of minimal VMs (kvmkit runner)"
MiB = 1 << 20
SIZES = ((128 * MiB, "128 MiB"), (1024 * MiB, "1 GiB"))
WAIT_ARGS = "ticks=1000000 rate=16 mem=16 mark=1"
SECOND_BATCH = "median of a second batch of runs"
#: Pause before each timed restore or boot: the previous VM's teardown (up to 1 GiB of
#: memory freed) is finished, not charged to the next run.
SETTLE_S = 0.05
HOST_CLOCK = "host clock around Machine.migrate"


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _kvm() -> Any:
    from kvmkit.kvm import Kvm

    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise Skip("no usable /dev/kvm")
    return Kvm()


def _config(image: Path, mem: int, args: str) -> Any:
    from kvmkit.runner.machine import RunConfig

    return RunConfig(image=image, append=args, mem_size=mem, echo=None)


def _first_mark_after(machine: Any, t0_ns: int, label: str) -> float:
    """Run ``machine`` on this thread, as ``kvmkit restore`` does, for 50 ms (the guest
    marks every ~40 µs: the first of its marks is kept whatever follows); ms from
    ``t0_ns`` to its first ``label`` mark, by the timestamp the mark was taken at."""
    machine.run(action=(0.05, lambda: ("stopped", "measured")))
    marks = [m for m in machine.ctx.marks if m.label == label]
    if not marks:
        raise RuntimeError(f"no {label!r} mark within 50 ms of the run's start")
    return (machine.ctx.start_ns + int(marks[0].t_s * 1e9) - t0_ns) / 1e6


def _snapshot(kvm: Any, image: Path, mem: int, where: Path) -> None:
    from kvmkit.runner.machine import run_guest

    r = run_guest(
        _config(image, mem, WAIT_ARGS),
        kvm=kvm,
        action=(0.3, lambda m: (m.snapshot(where, resume=False), ("snapshot", ""))[1]),
    )
    if r.reason != "snapshot":
        raise RuntimeError(f"the guest did not reach the snapshot: {r.reason} {r.detail}")


def _restore_ms(kvm: Any, where: Path, eager: bool) -> float:
    from kvmkit.runner.machine import Machine

    t0 = time.monotonic_ns()
    m = Machine.restore(where, kvm=kvm, echo=None, eager=eager)
    with m:
        return _first_mark_after(m, t0, "tick")


def _boot_ms(kvm: Any, image: Path, mem: int) -> float:
    """Cold boot from the image to the guest's ``main`` mark (the same clock as the
    restore figure): ``run_guest`` from its call, read once the guest waits."""
    from kvmkit.runner.machine import run_guest

    got: list[float] = []

    def read(machine: Any) -> tuple[str, str]:
        marks = [m for m in machine.ctx.marks if m.label == "main"]
        if marks:
            got.append((machine.ctx.start_ns + int(marks[0].t_s * 1e9) - t0) / 1e6)
        return "stopped", ""

    t0 = time.monotonic_ns()
    run_guest(_config(image, mem, WAIT_ARGS), kvm=kvm, action=(0.2, read))
    if not got:
        raise RuntimeError("the guest never reached main")
    return got[0]


def _process_s(argv: list[str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, timeout=120)
    wall = time.perf_counter() - t0
    if p.returncode != 124:
        raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}: {p.stderr[-300:]!r}")
    return wall * 1000


def _migrate(
    kvm: Any, image: Path, mem: int, args: str, addr: str, downtime_ms: float
) -> dict[str, float]:
    from kvmkit.runner.machine import run_guest
    from kvmkit.runner.migration.destination import start_destination

    out: dict[str, float] = {}

    def act(machine: Any) -> tuple[str, str]:
        t0 = time.perf_counter()
        stats = machine.migrate(addr, downtime_ms=downtime_ms)
        out["host_total_ms"] = (time.perf_counter() - t0) * 1000
        out["total_ms"] = stats.total_s * 1000
        out["downtime_ms"] = stats.downtime_s * 1000
        out["rounds"] = len(stats.rounds)
        out["mib"] = stats.bytes_sent / MiB
        return "migrated", ""

    # in its own process, as on another host; it runs what it receives for 0.2 s
    dest = start_destination(addr, args=("--timeout", "0.2"))
    try:
        r = run_guest(_config(image, mem, args), kvm=kvm, action=(0.3, act), dirty_tracking=True)
        err = dest.communicate(timeout=60)[1]
    finally:
        if dest.poll() is None:
            dest.kill()
            dest.wait()
    if r.reason != "migrated":
        raise RuntimeError(f"the migration did not complete: {r.reason} {r.detail}")
    if dest.returncode != 124:  # it ran the guest until its --timeout
        raise RuntimeError(f"the destination exited {dest.returncode}: {err[-300:]!r}")
    return out


def _restore_results(kvm: Any, image: Path, tmp: Path, n: int, backend: str) -> list[Result]:
    """The restore rows.  Every kind of run is interleaved with the others (128 MiB and
    1 GiB, lazy and eager, boot and restore), so a host that gets busier during the
    benchmark weighs on all of them alike, not on whichever came last; one untimed run of
    each kind comes first (the first run was slower in every batch A, which the
    cross-check then contradicted; cold start is what the whole-process rows measure)."""
    snaps = {mem: tmp / f"snap-{mem}" for mem, _ in SIZES}
    for mem, where in snaps.items():
        _snapshot(kvm, image, mem, where)
    kinds = [(mem, eager) for mem, _ in SIZES for eager in (False, True)]
    runs: dict[tuple[int, bool], tuple[list[float], list[float]]] = {k: ([], []) for k in kinds}
    boot: dict[int, list[float]] = {mem: [] for mem, _ in SIZES}
    for mem, eager in kinds:  # untimed: a first run's cold costs are the process rows' part
        _restore_ms(kvm, snaps[mem], eager)
    for mem, _ in SIZES:
        _boot_ms(kvm, image, mem)
    for batch in (0, 1):
        for _ in range(n):
            for mem, eager in kinds:
                time.sleep(SETTLE_S)
                runs[mem, eager][batch].append(_restore_ms(kvm, snaps[mem], eager))
            for mem, _ in SIZES:  # both batches boot too, so that they are alike
                time.sleep(SETTLE_S)
                got = _boot_ms(kvm, image, mem)
                if batch == 0:
                    boot[mem].append(got)
    kvmkit = [sys.executable, "-m", "kvmkit"]
    process: dict[tuple[int, str], list[float]] = {}
    for _ in range(n):
        for mem, _label in SIZES:
            boot_cmd = ["run", str(image), "--mem", str(mem), "--append", WAIT_ARGS]
            restore_cmd = ["restore", str(snaps[mem])]
            for what, argv in (("boot", boot_cmd), ("a", restore_cmd), ("b", restore_cmd)):
                got = _process_s([*kvmkit, *argv, "--timeout", "0.001"])
                process.setdefault((mem, what), []).append(got)

    out: list[Result] = []
    small = SIZES[0][0]
    for mem, label in SIZES:
        for eager in (False, True):
            kind = "eager" if eager else "lazy"
            a, b = runs[mem, eager]
            value, at_128 = _median(a), _median(runs[small, eager][0])
            if mem == small:
                target = "<= 5 ms" if not eager else None
            elif eager:  # reads all RAM first by design: shown to compare, no goal
                target = f"none (reads it all); {value / at_128:.2f}x of 128 MiB"
            else:
                target = (
                    f"<= 1.2x of 128 MiB {kind} ({1.2 * at_128:.2f} ms); here {value / at_128:.2f}x"
                )
            out.append(
                Result(
                    BENCH,
                    f"kvmkit runner ({backend}): {label} restore ({kind}) to first instruction",
                    value,
                    "ms",
                    baseline_case=f"{label} cold boot to main",
                    baseline=_median(boot[mem]),
                    target=target,
                    check=_median(b),
                    check_method=SECOND_BATCH,
                    extra={"runs": a + b, "boot_runs": boot[mem]},
                )
            )
        out.append(
            Result(
                BENCH,
                f"kvmkit runner ({backend}): {label} `kvmkit restore` whole process (lazy)",
                _median(process[mem, "a"]),
                "ms",
                baseline_case=f"{label} `kvmkit run` whole process",
                baseline=_median(process[mem, "boot"]),
                check=_median(process[mem, "b"]),
                check_method=SECOND_BATCH,
            )
        )
    for where in snaps.values():
        shutil.rmtree(where)
    return out


def run(quick: bool = False) -> list[Result]:
    from kvmkit.guests import build_guest

    n = 3 if quick else 7
    kvm = _kvm()
    image = build_guest("dirty")
    tmp = Path(tempfile.mkdtemp(prefix="kvmkit-bench-snap."))
    results: list[Result] = []
    backend = kvm.backend  # every case names it
    try:
        results += _restore_results(kvm, image, tmp, n, backend)

        cases = [(128 * MiB, 16, 5, "128 MiB nearly idle, --downtime-ms 5")]
        cases += [(1024 * MiB, 16, 5, "1 GiB nearly idle, --downtime-ms 5")]
        cases += [
            (128 * MiB, r, 50, f"128 MiB, {r} words/tick, --downtime-ms 50")
            for r in (256, 2048, 8192)
        ]
        for i, (mem, rate, target_ms, label) in enumerate(cases):
            args = f"ticks=1000000 rate={rate} mem=16"
            mig = [
                _migrate(kvm, image, mem, args, f"unix:{tmp}/m{i}-{j}.sock", target_ms)
                for j in range(2 * n)
            ]
            with warnings.catch_warnings():  # TCG + a short downtime: said in the docstring
                warnings.simplefilter("ignore")
                qemu = qemu_migrations(
                    image, mem_mib=mem // MiB, args=args, downtime_ms=target_ms, repeats=n
                )
            ma, mb = mig[:n], mig[n:]
            extra = {
                "rounds": [r["rounds"] for r in mig],
                "mib_sent": [round(r["mib"], 1) for r in mig],
                "dirty_mib_s": rate * 100 * 4096 / MiB,
                "qemu_downtime_ms": qemu.downtime_ms,
                "qemu_total_ms": qemu.total_ms,
                "qemu_mib_sent": [round(x, 1) for x in qemu.mib_sent],
            }
            who = f"kvmkit runner ({backend}): migrate {label}"
            same = f"QEMU ({qemu.accel}), same guest and size, downtime-limit {target_ms} ms"
            results.append(
                Result(
                    BENCH,
                    f"{who}: total time",
                    _median([r["total_ms"] for r in ma]),
                    "ms",
                    baseline_case=f"{same}: total time",
                    baseline=_median(qemu.total_ms),
                    check=_median([r["host_total_ms"] for r in ma]),
                    check_method=HOST_CLOCK,
                    extra=extra,
                )
            )
            results.append(
                Result(
                    BENCH,
                    f"{who}: downtime",
                    _median([r["downtime_ms"] for r in ma]),
                    "ms",
                    baseline_case=f"{same}: downtime",
                    baseline=_median(qemu.downtime_ms),
                    target="<= 5 ms" if i == 0 else None,
                    check=_median([r["downtime_ms"] for r in mb]),
                    check_method=SECOND_BATCH,
                    extra=extra,
                )
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        kvm.close()
    return results


def main() -> int:
    results = run(quick="--quick" in sys.argv)
    print(f"{TITLE}; baselines measured in the same run")
    print_results(results)
    for r in results:
        if "rounds" in r.extra and r.case.endswith("downtime"):
            print(
                f"  {r.case}: rounds {r.extra['rounds']}, MiB sent {r.extra['mib_sent']}, "
                f"dirty rate ~{r.extra['dirty_mib_s']:.0f} MiB/s; QEMU: downtimes "
                f"{r.extra['qemu_downtime_ms']} ms, MiB sent {r.extra['qemu_mib_sent']}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
