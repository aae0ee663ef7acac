"""Internal VM snapshots: take, change the guest, restore, and the change is gone."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmkit.qemu import qemu_img, snapshot
from kvmkit.qemu.config import Drive, MachineConfig
from kvmkit.qemu.errors import SnapshotError
from kvmkit.qemu.machine import QemuMachine


async def test_snapshot_save_change_load(
    kit_config: MachineConfig, qemu_base: Path, tmp_path: Path
) -> None:
    qemu_img.create(tmp_path / "root.qcow2", "32M")
    kit_config.drives = [Drive(str(tmp_path / "root.qcow2"), node="root")]
    async with QemuMachine(kit_config, base_dir=qemu_base) as vm:
        await vm.wait_ready()
        c = vm.console
        await c.run("echo original > /tmp/state; echo disk-original | dd of=/dev/vda 2>/dev/null")
        await snapshot.save(vm.qmp, "clean", vmstate="root", devices=["root"])
        names = [s["name"] for s in await snapshot.list_snapshots(vm.qmp, "root")]
        assert names == ["clean"]

        await c.run("echo changed > /tmp/state; echo disk-changed!! | dd of=/dev/vda 2>/dev/null")
        assert (await c.run("cat /tmp/state")).strip() == "changed"

        await snapshot.load(vm.qmp, "clean", vmstate="root", devices=["root"])
        assert await vm.status() == "running"
        assert (await c.run("cat /tmp/state")).strip() == "original"
        assert (await c.run("head -c 13 /dev/vda")).strip() == "disk-original"

        with pytest.raises(SnapshotError):
            await snapshot.load(vm.qmp, "no-such-tag", vmstate="root", devices=["root"])
        await snapshot.delete(vm.qmp, "clean", devices=["root"])
        assert await snapshot.list_snapshots(vm.qmp, "root") == []
