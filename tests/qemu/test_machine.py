"""QemuMachine with a real QEMU and the guest kit: lifecycle, launch failure, cancellation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from kvmkit.qemu import hotplug
from kvmkit.qemu.config import MachineConfig
from kvmkit.qemu.errors import LaunchError, UnsupportedOperation
from kvmkit.qemu.machine import QemuMachine, State


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text()


async def test_full_lifecycle(kit_config: MachineConfig, qemu_base: Path) -> None:
    async with QemuMachine(kit_config, base_dir=qemu_base) as vm:
        assert vm.accel.name in ("kvm", "tcg") and vm.accel.reason
        assert f"-accel {vm.accel.name}" in " ".join(vm.cmdline)
        directory = vm.directory
        assert directory is not None and directory.stat().st_mode & 0o777 == 0o700
        assert vm.qmp_socket.exists() and vm.console_socket.exists()
        await vm.wait_ready()
        assert (await vm.console.run("uname -r")).strip() == Path(
            str(kit_config.kernel)
        ).parent.name
        assert await vm.status() == "running"

        await vm.pause()
        assert await vm.status() == "paused"
        # device_del on a paused VM would never complete: refused up front.
        with pytest.raises(UnsupportedOperation, match="paused"):
            await hotplug.remove_device(vm.qmp, "nothing")
        await vm.resume()
        assert (await vm.console.run("echo alive")).strip() == "alive"
        assert "KVMKIT-GUEST-READY" in vm.console.transcript
        pid = vm.pid
        assert pid is not None
    # The guest powered off through ACPI (the first rung of the ladder).
    assert vm.shutdown_step == "system_powerdown"
    assert vm.state is State.STOPPED and vm.exit_code == 0
    assert not _alive(pid)
    assert not directory.exists()


async def test_bad_argument_gives_clear_launch_error(
    kit_config: MachineConfig, qemu_base: Path
) -> None:
    kit_config.extra_args = ["-device", "no-such-device-kvmkit"]
    vm = QemuMachine(kit_config, base_dir=qemu_base)
    with pytest.raises(LaunchError) as info:
        await vm.launch()
    err = info.value
    assert err.exit_code == 1
    assert "no-such-device-kvmkit" in err.log_tail
    assert "no-such-device-kvmkit" in " ".join(err.cmdline)
    assert "exit code 1" in str(err) and "QEMU said" in str(err)
    assert vm.directory is not None and not vm.directory.exists()


async def test_missing_binary_is_a_launch_error(kit_config: MachineConfig, qemu_base: Path) -> None:
    kit_config.qemu_binary = "/nonexistent/qemu-system-x86_64"
    with pytest.raises(LaunchError, match="cannot start"):
        async with QemuMachine(kit_config, base_dir=qemu_base):
            pass


async def test_cancellation_tears_everything_down(
    kit_config: MachineConfig, qemu_base: Path
) -> None:
    vm = QemuMachine(kit_config, base_dir=qemu_base, powerdown_timeout=1.0)
    with trio.move_on_after(1.5) as scope:
        async with vm:
            pid = vm.pid
            await trio.sleep_forever()
    assert scope.cancelled_caught
    # The ladder still spoke QMP (over a fresh connection) despite the cancellation.
    assert vm.shutdown_step in ("system_powerdown", "quit")
    assert pid is not None and not _alive(pid)
    assert vm.state is State.STOPPED
    assert vm.directory is not None and not vm.directory.exists()


async def test_kill_skips_the_ladder(kit_config: MachineConfig, qemu_base: Path) -> None:
    async with QemuMachine(kit_config, base_dir=qemu_base) as vm:
        pid = vm.pid
        await vm.kill()
        assert vm.exit_code is not None and vm.exit_code < 0
    assert pid is not None and not _alive(pid)


async def test_machines_in_a_nursery_close_in_any_order(
    kit_config: MachineConfig, qemu_base: Path
) -> None:
    async with trio.open_nursery() as nursery:
        first = QemuMachine(kit_config, base_dir=qemu_base, incoming="defer")
        second = QemuMachine(kit_config, base_dir=qemu_base, incoming="defer")
        await first.launch(nursery)
        await second.launch(nursery)
        assert await first.status() == "inmigrate" and await second.status() == "inmigrate"
        pids = [first.pid, second.pid]
        await first.aclose()  # not LIFO: fine with a nursery
        assert first.state is State.STOPPED and first.shutdown_step == "quit"
        assert await second.status() == "inmigrate"
        # Cancelling the nursery tears the second one down (the ladder is shielded).
        nursery.cancel_scope.cancel()
    assert second.state is State.STOPPED and second.shutdown_step == "quit"
    assert all(pid is not None and not _alive(pid) for pid in pids)
    assert first.directory is not None and not first.directory.exists()
    assert second.directory is not None and not second.directory.exists()


async def test_ladder_falls_back_to_sigterm_without_qmp(
    kit_config: MachineConfig, qemu_base: Path
) -> None:
    async with QemuMachine(kit_config, base_dir=qemu_base, incoming="defer") as vm:
        pid = vm.pid
        await vm.qmp.aclose()  # QMP gone: the ladder can only signal
    assert vm.shutdown_step == "SIGTERM"
    assert vm.exit_code is not None and pid is not None and not _alive(pid)


async def test_qmp_over_a_socketpair(kit_config: MachineConfig, qemu_base: Path) -> None:
    async with QemuMachine(kit_config, base_dir=qemu_base, qmp_transport="socketpair") as vm:
        assert not vm.qmp_socket.exists()
        assert "mode=control" in " ".join(vm.cmdline)
        await vm.wait_ready()
        assert (await vm.qmp.execute("query-status"))["status"] == "running"
        assert (await vm.console.run("echo pair")).strip() == "pair"
    assert vm.shutdown_step == "system_powerdown" and vm.exit_code == 0
