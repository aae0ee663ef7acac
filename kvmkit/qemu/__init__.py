"""kvmkit.qemu: full QEMU guests driven over QMP.

Typical use::

    from kvmkit.qemu import QemuMachine, ensure_kit, guest_kit_config, hotplug, migration

    config = guest_kit_config(ensure_kit(), memory_mib=256, maxcpus=2)
    async with QemuMachine(config) as vm:
        await vm.wait_ready()
        disk = await hotplug.add_disk(vm.qmp, "extra.qcow2", console=vm.console)
        print(await vm.console.run(f"cat /sys/block/{disk.guest_name}/size"))

Modules: :mod:`.machine` (launch, console, shutdown ladder), :mod:`.config` (command
line), :mod:`.guestkit` (the Linux guest), :mod:`.hotplug`, :mod:`.snapshot`,
:mod:`.migration`, :mod:`.qemu_img`, :mod:`.accel`, :mod:`.console`, :mod:`.errors`.
"""

from kvmkit.qemu.accel import AccelChoice, choose_accel, kvm_backend
from kvmkit.qemu.config import Drive, MachineConfig, build_command, guest_kit_config
from kvmkit.qemu.console import SerialConsole
from kvmkit.qemu.errors import (
    ConsoleError,
    ConsoleTimeout,
    GuestKitError,
    HotplugError,
    LaunchError,
    MachineStateError,
    MigrationError,
    QemuError,
    QemuImgError,
    SnapshotError,
    UnsupportedOperation,
    VmStateError,
)
from kvmkit.qemu.guestkit import GuestKit, build_kit, ensure_kit, find_kit
from kvmkit.qemu.machine import QemuMachine

__all__ = [
    "QemuMachine",
    "MachineConfig",
    "Drive",
    "guest_kit_config",
    "build_command",
    "GuestKit",
    "ensure_kit",
    "build_kit",
    "find_kit",
    "SerialConsole",
    "AccelChoice",
    "choose_accel",
    "kvm_backend",
    "QemuError",
    "LaunchError",
    "MachineStateError",
    "ConsoleError",
    "ConsoleTimeout",
    "GuestKitError",
    "HotplugError",
    "UnsupportedOperation",
    "SnapshotError",
    "MigrationError",
    "QemuImgError",
    "VmStateError",
]
