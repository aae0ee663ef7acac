"""Hotplug with a real guest: each operation checked from inside the guest."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmkit.qemu import hotplug, qemu_img
from kvmkit.qemu.config import MachineConfig
from kvmkit.qemu.errors import HotplugError, UnsupportedOperation
from kvmkit.qemu.machine import QemuMachine


async def test_pci_disk_and_nic(kit_config: MachineConfig, qemu_base: Path, tmp_path: Path) -> None:
    disk = tmp_path / "extra.raw"
    qemu_img.create(disk, "8M", fmt="raw")
    sentinel = b"kvmkit-sentinel-7f3a\n"
    with disk.open("r+b") as f:
        f.write(sentinel)
    async with QemuMachine(kit_config, base_dir=qemu_base) as vm:
        await vm.wait_ready()
        plugged = await hotplug.add_disk(vm.qmp, str(disk), fmt="raw", console=vm.console)
        assert plugged.guest_name is not None and plugged.guest_name.startswith("vd")
        assert plugged.guest_name in (await vm.console.run("ls /sys/block")).split()
        read = await vm.console.run(f"head -c {len(sentinel)} /dev/{plugged.guest_name}")
        assert read.encode() == sentinel
        assert plugged.id in await hotplug.device_ids(vm.qmp)

        latency = await hotplug.remove_disk(vm.qmp, plugged.id)
        assert latency > 0
        assert plugged.id not in await hotplug.device_ids(vm.qmp)
        await hotplug.guest_wait(vm.console, f"[ ! -e /sys/block/{plugged.guest_name} ]")
        nodes = await vm.qmp.execute("query-named-block-nodes")
        assert plugged.id not in [n["node-name"] for n in nodes]
        # The guest logged the events through its uevent watcher.
        log = await vm.console.run("cat /run/kvmkit-uevents")
        assert "add block /devices/" in log and "remove block" in log

        nic = await hotplug.add_nic(vm.qmp, console=vm.console)
        assert nic in await hotplug.device_ids(vm.qmp)
        await hotplug.remove_nic(vm.qmp, nic)
        assert nic not in await hotplug.device_ids(vm.qmp)

        with pytest.raises(HotplugError, match="DEVICE_DELETED|not found|No device"):
            await hotplug.remove_device(vm.qmp, "never-plugged", timeout=2)


async def test_cpu_memory_and_balloon(guest_kit: object, qemu_base: Path) -> None:
    from kvmkit.qemu.config import guest_kit_config

    config = guest_kit_config(
        guest_kit,  # type: ignore[arg-type]
        memory_mib=256,
        maxmem_mib=1024,
        memory_slots=2,
        cpus=1,
        maxcpus=2,
        balloon=True,
    )
    async with QemuMachine(config, base_dir=qemu_base) as vm:
        await vm.wait_ready()
        console = vm.console
        assert (await console.run("cat /sys/devices/system/cpu/online")).strip() == "0"
        cpu = await hotplug.add_cpu(vm.qmp, console=console)
        assert (await console.run("cat /sys/devices/system/cpu/online")).strip() == "0-1"
        assert (await console.run("cat /sys/devices/system/cpu/cpu1/online")).strip() == "1"
        with pytest.raises(HotplugError, match="no free CPU slot"):
            await hotplug.add_cpu(vm.qmp)
        if await hotplug.cpu_unplug_problem(vm.qmp):
            with pytest.raises(UnsupportedOperation, match="crashes QEMU"):
                await hotplug.remove_cpu(vm.qmp, cpu)
            assert await vm.status() == "running"

        def mem_total(text: str) -> int:
            return int(text.split()[1])

        before = mem_total(await console.run("grep MemTotal /proc/meminfo"))
        dimm = await hotplug.add_memory(vm.qmp, 128, console=console)
        after = mem_total(await console.run("grep MemTotal /proc/meminfo"))
        assert after - before == 128 * 1024
        states = await console.run("cat /sys/devices/system/memory/memory*/state")
        assert "offline" not in states
        await hotplug.remove_memory(vm.qmp, dimm)
        await hotplug.guest_wait(
            console,
            f"[ \"$(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)\" = {before} ]",
        )
        # A failing second step rolls the first back: no backend object is left behind.
        with pytest.raises(HotplugError):
            await hotplug.add_memory(vm.qmp, 2048, dimm_id="toolarge")
        objects = [o["name"] for o in await vm.qmp.execute("qom-list", {"path": "/objects"})]
        assert "mem-toolarge" not in objects

        assert await hotplug.balloon_actual_mib(vm.qmp) == 256
        actual = await hotplug.set_balloon(vm.qmp, 160)
        assert abs(actual - 160) <= 2
        free_kb = await console.run("grep MemTotal /proc/meminfo")
        assert mem_total(free_kb) < before
        assert abs(await hotplug.set_balloon(vm.qmp, 256) - 256) <= 2


async def test_q35_hotplug_uses_root_ports(
    guest_kit: object, qemu_base: Path, tmp_path: Path
) -> None:
    from kvmkit.qemu.config import guest_kit_config

    config = guest_kit_config(guest_kit, machine="q35", hotplug_ports=1)  # type: ignore[arg-type]
    disks = []
    for name in ("a", "b"):
        disks.append(tmp_path / f"{name}.qcow2")
        qemu_img.create(disks[-1], "8M")
    async with QemuMachine(config, base_dir=qemu_base) as vm:
        await vm.wait_ready()
        assert await hotplug.free_hotplug_bus(vm.qmp) == "hp0"
        plugged = await hotplug.add_disk(vm.qmp, str(disks[0]), console=vm.console)
        assert plugged.guest_name == "vda"
        # The only root port is taken: the second disk is refused and nothing is left over.
        with pytest.raises(HotplugError, match="root ports are in use"):
            await hotplug.add_disk(vm.qmp, str(disks[1]), disk_id="second")
        nodes = [n["node-name"] for n in await vm.qmp.execute("query-named-block-nodes")]
        assert "second" not in nodes and "second-file" not in nodes
        await hotplug.remove_disk(vm.qmp, plugged.id)
        assert await hotplug.free_hotplug_bus(vm.qmp) == "hp0"
