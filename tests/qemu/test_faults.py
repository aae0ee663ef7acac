"""Fault injection against real QEMU: what kvmkit does when the world breaks mid-operation.

- the migration destination is killed mid-migration: the source keeps (or resumes)
  running and the guest's counter goes on;
- QEMU is killed in the middle of a hot-plug: a clear kvmkit error, promptly;
- the disk fills up during an internal snapshot (a small tmpfs this test mounts and
  unmounts): a clear error, and the VM keeps running.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from kvmkit.errors import KvmkitError
from kvmkit.qemu import hotplug, qemu_img, snapshot
from kvmkit.qemu import migration as mig
from kvmkit.qemu.config import Drive, MachineConfig
from kvmkit.qemu.console import SerialConsole
from kvmkit.qemu.errors import MigrationError, SnapshotError
from kvmkit.qemu.machine import QemuMachine

COUNTER = "(i=0; while true; do i=$((i+1)); echo $i > /tmp/c.new; mv /tmp/c.new /tmp/counter; sleep 0.05; done) >/dev/null 2>&1 &"  # fmt: skip


async def _counter(console: SerialConsole) -> int:
    return int((await console.run("cat /tmp/counter")).strip())


async def _counter_goes_on(console: SerialConsole) -> None:
    before = await _counter(console)
    await console.run(
        f'while [ "$(cat /tmp/counter)" -le {before} ]; do sleep 0.1; done', timeout=60
    )


async def test_killed_destination_mid_migration_leaves_the_source_running(
    kit_config: MachineConfig, qemu_base: Path
) -> None:
    slow = mig.MigrationOptions(max_bandwidth=2 * 2**20)  # 256 MiB at 2 MiB/s: minutes
    async with QemuMachine(kit_config, base_dir=qemu_base) as src:
        await src.wait_ready()
        await src.console.run(COUNTER)
        await _counter_goes_on(src.console)
        async with QemuMachine(kit_config, base_dir=qemu_base, incoming="defer") as dst:
            uri = await mig.prepare_incoming(dst.qmp, "tcp:127.0.0.1:0")
            seen: list[str] = []
            migrating = trio.Event()

            def on_progress(info: dict[str, Any]) -> None:
                seen.append(info["status"])
                if info["status"] == "active":
                    migrating.set()

            async def kill_destination_once_migrating() -> None:
                await migrating.wait()
                assert dst.pid is not None
                os.kill(dst.pid, signal.SIGKILL)  # a QEMU this test started

            async with trio.open_nursery() as nursery:
                nursery.start_soon(kill_destination_once_migrating)
                with pytest.raises(MigrationError) as info:
                    await mig.migrate(
                        src.qmp,
                        uri,
                        options=slow,
                        timeout=120,
                        progress=on_progress,
                        poll_interval=0.05,
                    )
            assert "active" in seen
            assert str(info.value)
        assert await src.status() == "running"
        await _counter_goes_on(src.console)


async def test_qemu_killed_during_hotplug_is_a_clear_error(
    kit_config: MachineConfig, qemu_base: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "hot.qcow2"
    qemu_img.create(disk, "16M")
    async with QemuMachine(kit_config, base_dir=qemu_base) as vm:
        await vm.wait_ready()
        assert vm.pid is not None
        pid = vm.pid
        error: BaseException | None = None

        async def plug() -> None:
            nonlocal error
            try:
                # waits for the guest to see the disk: QEMU dies somewhere in there
                await hotplug.add_disk(vm.qmp, str(disk), console=vm.console, timeout=30)
            except BaseException as exc:  # what the caller would see, whatever it is
                error = exc

        with trio.fail_after(60):  # "never a hang": the error must come promptly
            async with trio.open_nursery() as nursery:
                nursery.start_soon(plug)
                await trio.sleep(0.02)
                os.kill(pid, signal.SIGKILL)
        assert error is not None, "the hot-plug reported success on a killed QEMU"
        assert isinstance(error, KvmkitError), repr(error)
        assert str(error)
        print(f"hot-plug on a killed QEMU: {error!r}")
    assert not vm.running


@contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` for the block, unmounted after."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)
        where.rmdir()


async def test_full_disk_during_internal_snapshot_is_a_clear_error(
    kit_config: MachineConfig, qemu_base: Path, tmp_path: Path
) -> None:
    with small_tmpfs(tmp_path / "small", "24M") as small:
        root = small / "root.qcow2"
        qemu_img.create(root, "64M")
        kit_config.drives = [Drive(str(root), node="root")]
        async with QemuMachine(kit_config, base_dir=qemu_base) as vm:
            await vm.wait_ready()
            await vm.console.run(COUNTER)
            # guest RAM worth saving: 48 MiB of random bytes in the guest's tmpfs
            await vm.console.run("dd if=/dev/urandom of=/tmp/fill bs=1M count=48 2>/dev/null")
            with pytest.raises(SnapshotError) as info:
                await snapshot.save(vm.qmp, "full", vmstate="root", devices=["root"], timeout=120)
            # QEMU 7.2 reports the ENOSPC of the vmstate write as an I/O error
            assert "writing VM state" in str(info.value), info.value
            assert "full" not in [s["name"] for s in await snapshot.list_snapshots(vm.qmp, "root")]
            assert await vm.status() == "running"
            await _counter_goes_on(vm.console)
