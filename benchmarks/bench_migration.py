"""Live migration of a 512 MiB guest-kit guest between two local QEMUs over tcp.

Cases, all measured in this run on the same booted guest (it hops from QEMU to QEMU):

- idle guest over tcp, against the baseline of saving the same idle guest to a file
  through ``exec:cat`` (no second QEMU has to load the state);
- a guest that keeps dirtying memory (copies 16 MiB of random data round-robin into a
  128 MiB tmpfs file) over tcp, against the idle guest over tcp as the baseline.

Every migration of the dirtying guest is checked: the md5 of a file the guest wrote
before must be unchanged on the destination.  Reported per case: total time, downtime
and MiB sent (medians).  Total times (QEMU's own ``query-migrate`` figure) are
cross-checked by the host's clock around the whole hop; downtime and data sent have only
QEMU's own figures and are printed as not cross-checked.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from benchmarks.common import Result, Skip
from benchmarks.report import print_results
from kvmkit.qemu import migration as mig
from kvmkit.qemu.config import guest_kit_config
from kvmkit.qemu.guestkit import ensure_kit, find_kit
from kvmkit.qemu.machine import QemuMachine

TITLE = "Live migration of a 512 MiB guest (QEMU, TCG here)"
BENCH = "migration"
MEMORY_MIB = 512
MIB = 2**20

DIRTY = (
    "dd if=/dev/urandom of=/tmp/r bs=1M count=16 2>/dev/null; "
    "(i=0; while true; do i=$((i+1)); echo $i > /tmp/c.new; mv /tmp/c.new /tmp/counter; "
    "dd if=/tmp/r of=/tmp/dirty bs=1M seek=$((i % 8 * 16)) conv=notrunc 2>/dev/null; "
    "done) >/dev/null 2>&1 &"
)


async def _hop(
    nursery: trio.Nursery, src: QemuMachine, config: Any, base: Path, host_ms: list[float]
) -> tuple[QemuMachine, mig.MigrationStats]:
    """Migrate ``src`` over tcp into a new QEMU; return it (entered) and the statistics,
    appending the host clock's milliseconds for the migration to ``host_ms``.  The caller
    closes the old machine."""
    dst = QemuMachine(config, incoming="defer", base_dir=base)
    await dst.launch(nursery)
    try:
        start = time.perf_counter()
        stats = await mig.migrate_machine(src, dst, transport="tcp")
        host_ms.append((time.perf_counter() - start) * 1e3)
    except BaseException:
        await dst.aclose()
        raise
    return dst, stats


async def _measure(repeats: int) -> dict[str, Any]:
    config = guest_kit_config(ensure_kit(), memory_mib=MEMORY_MIB)
    base = Path(tempfile.mkdtemp(prefix="kvmkit-bench-migration-"))
    idle_tcp: list[mig.MigrationStats] = []
    idle_file: list[mig.MigrationStats] = []
    dirty_tcp: list[mig.MigrationStats] = []
    host: dict[str, list[float]] = {"idle_tcp": [], "dirty_tcp": []}
    async with trio.open_nursery() as nursery:
        vm = QemuMachine(config, base_dir=base)
        await vm.launch(nursery)
        try:
            await vm.wait_ready()
            accel = vm.accel.name
            await vm.console.run("dd if=/dev/urandom of=/tmp/data bs=1M count=4 2>/dev/null")
            checksum = await mig.guest_checksum(vm.console, "/tmp/data")
            for _ in range(repeats):
                state = base / "idle.state"
                idle_file.append(await mig.save_to_file(vm.qmp, state))
                state.unlink()
                await vm.qmp.execute("cont")
                new, stats = await _hop(nursery, vm, config, base, host["idle_tcp"])
                await vm.aclose()
                vm = new
                idle_tcp.append(stats)

            await vm.console.run(DIRTY)
            await vm.console.run("while [ ! -s /tmp/counter ]; do sleep 0.1; done")
            c0 = int(await vm.console.run("cat /tmp/counter"))
            t0 = time.perf_counter()
            await trio.sleep(3)
            c1 = int(await vm.console.run("cat /tmp/counter"))
            dirty_rate = (c1 - c0) * 16 / (time.perf_counter() - t0)
            for _ in range(repeats):
                new, stats = await _hop(nursery, vm, config, base, host["dirty_tcp"])
                await vm.aclose()
                vm = new
                if await mig.guest_checksum(vm.console, "/tmp/data") != checksum:
                    raise RuntimeError("guest file checksum changed across migration")
                dirty_tcp.append(stats)
            counter = int(await vm.console.run("cat /tmp/counter"))
            if counter <= c1:
                raise RuntimeError("the guest's counter did not go on after migrating")
        finally:
            with trio.CancelScope(shield=True):
                await vm.aclose()
            base.rmdir()  # noqa: ASYNC240 - one rmdir of an empty local folder at teardown
    return {
        "idle_tcp": idle_tcp,
        "idle_file": idle_file,
        "dirty_tcp": dirty_tcp,
        "dirty_rate_mib_s": dirty_rate,
        "accel": accel,
        "host_ms": host,
    }


def _median(stats: list[mig.MigrationStats], attr: str) -> float:
    return float(statistics.median(getattr(s, attr) for s in stats))


def _sent_mib(stats: list[mig.MigrationStats]) -> float:
    return float(statistics.median(s.transferred_bytes / MIB for s in stats))


HOST_CLOCK = "host clock around the whole migration"


def run(quick: bool = False) -> list[Result]:
    if shutil.which("qemu-system-x86_64") is None:
        raise Skip("qemu-system-x86_64 is not installed")
    if find_kit() is None and (shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None):
        raise Skip("no guest kit and no apt-get/dpkg-deb to build one")
    data = trio.run(_measure, 2 if quick else 5)
    idle_tcp = data["idle_tcp"]
    idle_file = data["idle_file"]
    dirty = data["dirty_tcp"]
    assert isinstance(idle_tcp, list) and isinstance(idle_file, list) and isinstance(dirty, list)
    extra_common = {
        "setup": f"QEMU -accel {data['accel']}, {MEMORY_MIB} MiB guest",
        "dirty_rate_mib_s": round(float(data["dirty_rate_mib_s"]), 1),
    }

    def samples(stats: list[mig.MigrationStats]) -> dict[str, Any]:
        return {"runs": [s.to_json() for s in stats], **extra_common}

    return [
        Result(
            BENCH,
            "idle guest, tcp: total time",
            _median(idle_tcp, "total_time_ms"),
            "ms",
            baseline_case="idle guest, save to file (exec:cat): total time",
            baseline=_median(idle_file, "total_time_ms"),
            check=statistics.median(data["host_ms"]["idle_tcp"]),
            check_method=HOST_CLOCK,
            extra={"tcp": samples(idle_tcp), "file": samples(idle_file)},
        ),
        Result(
            BENCH,
            "dirtying guest, tcp: total time",
            _median(dirty, "total_time_ms"),
            "ms",
            baseline_case="idle guest, tcp: total time",
            baseline=_median(idle_tcp, "total_time_ms"),
            check=statistics.median(data["host_ms"]["dirty_tcp"]),
            check_method=HOST_CLOCK,
            extra=samples(dirty),
        ),
        Result(
            BENCH,
            "dirtying guest, tcp: downtime",
            _median(dirty, "downtime_ms"),
            "ms",
            baseline_case="idle guest, tcp: downtime",
            baseline=_median(idle_tcp, "downtime_ms"),
            extra=extra_common,
        ),
        Result(
            BENCH,
            "dirtying guest, tcp: data sent",
            _sent_mib(dirty),
            "MiB",
            baseline_case="idle guest, tcp: data sent",
            baseline=_sent_mib(idle_tcp),
            extra=extra_common,
        ),
    ]


def main() -> int:
    quick = "--quick" in sys.argv
    results = run(quick=quick)
    dirty = results[1].extra
    print(f"{TITLE} ({dirty['setup']}); baselines measured in the same run")
    print_results(results)
    print(f"  guest dirty rate ~{dirty['dirty_rate_mib_s']} MiB/s; per-run statistics:")
    for label, runs in (
        ("idle tcp", results[0].extra["tcp"]["runs"]),
        ("idle file", results[0].extra["file"]["runs"]),
        ("dirtying tcp", dirty["runs"]),
    ):
        for s in runs:
            print(
                f"    {label:<12} total {s['total_time_ms']:5d} ms  downtime {s['downtime_ms']:4d} ms"
                f"  setup {s['setup_time_ms']:3d} ms  sent {s['transferred_bytes'] / MIB:6.1f} MiB"
                f"  {s['throughput_mib_s']:7.1f} MiB/s  dirty syncs {s['dirty_sync_count']}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
