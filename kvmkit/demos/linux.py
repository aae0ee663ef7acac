"""A full Linux guest under QEMU, driven over QMP: boot it, hot-add a disk and find it
inside, then live-migrate it to a second QEMU while it keeps counting, sampling
``query-migrate`` for a timeline of the bytes still to send."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from kvmkit.demos.progress import Say
from kvmkit.qemu import guestkit, hotplug, qemu_img
from kvmkit.qemu import migration as mig
from kvmkit.qemu.config import guest_kit_config
from kvmkit.qemu.machine import QemuMachine

COUNTER = (
    "(i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.05; done) >/dev/null 2>&1 &"
)


async def _counter(machine: QemuMachine) -> int:
    return int((await machine.console.run("cat /tmp/counter")).strip())


async def _qmp_rate(machine: QemuMachine, seconds: float) -> float:
    """Sequential ``query-status`` round trips per second through kvmkit's QMP client."""
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        await machine.qmp.execute("query-status")
        done += 1
    return done / (time.perf_counter() - start)


async def linux_demo(say: Say, *, memory_mib: int = 512) -> dict[str, Any]:
    """Run the whole scene; ``say`` gets one line per milestone.  Returns the figures."""
    kit = guestkit.ensure_kit()
    config = guest_kit_config(kit, memory_mib=memory_mib)
    figures: dict[str, Any] = {"kernel": kit.kernel_version, "memory_mib": memory_mib}
    with tempfile.TemporaryDirectory(prefix="kvmkit-demo-") as tmp:
        base = Path(tmp)
        start = time.perf_counter()
        async with QemuMachine(config, base_dir=base) as src:
            await src.wait_ready()
            figures["boot_s"] = time.perf_counter() - start
            figures["accel"] = src.describe().get("accel")
            say(
                f"booted Linux {kit.kernel_version} under QEMU ({figures['accel']}) in {figures['boot_s']:.1f} s"
            )

            disk_path = base / "extra.qcow2"
            qemu_img.create(disk_path, "64M", fmt="qcow2")
            disk = await hotplug.add_disk(src.qmp, str(disk_path), console=src.console)
            sectors = int((await src.console.run(f"cat /sys/block/{disk.guest_name}/size")).strip())
            figures["hotplug_disk"] = {
                "guest_name": disk.guest_name,
                "seconds": disk.seconds,
                "sectors": sectors,
            }
            say(
                f"hot-added a 64 MiB qcow2 disk: the guest sees /dev/{disk.guest_name} "
                f"({sectors * 512 >> 20} MiB) after {disk.seconds:.2f} s"
            )
            figures["unplug_s"] = await hotplug.remove_disk(src.qmp, disk.id)
            say(f"unplugged it again: DEVICE_DELETED after {figures['unplug_s']:.2f} s")

            figures["qmp_query_status_per_s"] = await _qmp_rate(src, 0.5)
            say(
                f"QMP round trips (query-status, kvmkit client): {figures['qmp_query_status_per_s']:.0f}/s"
            )

            await src.console.run(COUNTER)
            await trio.sleep(0.5)
            before = await _counter(src)
            async with QemuMachine(config, base_dir=base, incoming="defer") as dst:
                uri = await mig.prepare_incoming(dst.qmp, mig.local_uri(dst, "unix"))
                samples: list[dict[str, float]] = []
                t0 = time.perf_counter()

                def sample(info: dict[str, Any]) -> None:
                    ram = info.get("ram", {})
                    samples.append(
                        {
                            "t_s": time.perf_counter() - t0,
                            "remaining_bytes": float(ram.get("remaining", 0)),
                            "transferred_bytes": float(ram.get("transferred", 0)),
                        }
                    )

                stats = await mig.migrate(
                    src.qmp, uri, dest=dst.qmp, progress=sample, poll_interval=0.02
                )
                await dst.console.run(
                    f'while [ "$(cat /tmp/counter)" -le {before} ]; do sleep 0.05; done', timeout=60
                )
                after = await _counter(dst)
                figures["migration"] = stats.to_json() | {
                    "samples": samples,
                    "counter_before": before,
                    "counter_after": after,
                }
                say("live-migrated to a second QEMU: " + stats.summary())
                say(f"the guest kept counting: {before} on the source, {after} on the destination")
    return figures
