"""QEMU live-migrating the runner's own ``dirty`` guest: the baseline beside which
``bench_snapshot`` puts kvmkit's migrations of the same guest, the same RAM size, the
same arguments and the same downtime target, in the same run.

QEMU runs the guest as ``kvmkit run`` does (``-M pc``, multiboot ``-kernel``, debug
console on 0xe9, exit port 0xf4; the accelerator its launch ladder picks) and hops it
from QEMU to QEMU over a unix socket, as ``benchmarks/bench_migration.py`` does with
the Linux guest.  QEMU's own ``query-migrate`` gives total time and downtime.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import trio

from benchmarks.common import Skip
from kvmkit.demos.engines import runner_guest_devices
from kvmkit.qemu import migration as mig
from kvmkit.qemu.config import MachineConfig
from kvmkit.qemu.machine import QemuMachine

#: The guest prints this line once it is set up and about to start its ticks.
_STARTED = b"ticks at"


@dataclass
class QemuMigrations:
    """What ``repeats`` hops of one guest measured (QEMU's own figures)."""

    accel: str
    total_ms: list[float] = field(default_factory=list)
    downtime_ms: list[float] = field(default_factory=list)
    mib_sent: list[float] = field(default_factory=list)


def _config(image: Path, mem_mib: int, args: str, console: Path) -> MachineConfig:
    return MachineConfig(
        name="bench-dirty",
        memory_mib=mem_mib,
        kernel=str(image),
        append=args,
        extra_args=runner_guest_devices(console),
    )


async def _wait_started(console: Path, timeout: float) -> None:
    with trio.fail_after(timeout):
        while True:  # QEMU writes the file: nothing to wait on but the file itself
            if console.exists() and _STARTED in console.read_bytes():  # noqa: ASYNC240
                return
            await trio.sleep(0.05)


async def _measure(
    image: Path, mem_mib: int, args: str, downtime_ms: int, repeats: int
) -> QemuMigrations:
    base = Path(tempfile.mkdtemp(prefix="kvmkit-bench-qemu-dirty."))
    options = mig.MigrationOptions(downtime_limit_ms=downtime_ms)
    try:
        async with trio.open_nursery() as nursery:
            vm = QemuMachine(_config(image, mem_mib, args, base / "console-0"), base_dir=base)
            await vm.launch(nursery)
            try:
                out = QemuMigrations(accel=vm.accel.name)
                await _wait_started(base / "console-0", 120)
                await trio.sleep(0.3)  # as the kvmkit side: migrate once it has ticked
                for i in range(1, repeats + 1):
                    config = _config(image, mem_mib, args, base / f"console-{i}")
                    dst = QemuMachine(config, incoming="defer", base_dir=base)
                    await dst.launch(nursery)
                    try:
                        stats = await mig.migrate_machine(vm, dst, options=options)
                    except BaseException:
                        with trio.CancelScope(shield=True):
                            await dst.aclose()
                        raise
                    out.total_ms.append(float(stats.total_time_ms))
                    out.downtime_ms.append(float(stats.downtime_ms))
                    out.mib_sent.append(stats.transferred_bytes / (1 << 20))
                    await vm.aclose()
                    vm = dst
                    await trio.sleep(0.3)
                return out
            finally:
                with trio.CancelScope(shield=True):
                    await vm.aclose()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def qemu_migrations(
    image: Path, *, mem_mib: int, args: str, downtime_ms: int, repeats: int
) -> QemuMigrations:
    """Boot ``image`` with ``args`` under QEMU and migrate it ``repeats`` times.  Raises
    :class:`Skip` when this host has no QEMU."""
    if shutil.which("qemu-system-x86_64") is None:
        raise Skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    return trio.run(_measure, image, mem_mib, args, downtime_ms, repeats)
