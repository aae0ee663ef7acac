"""kvmkit starts QEMU with default signal dispositions, even when kvmkit itself runs with
SIGINT ignored (as a background job does): an ignored signal would survive exec."""

from __future__ import annotations

import signal
from pathlib import Path

from kvmkit.qemu.config import MachineConfig
from kvmkit.qemu.machine import QemuMachine


def _ignored(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return int(line.split()[1], 16)
    raise AssertionError("no SigIgn line")


async def test_qemu_starts_with_sigint_at_its_default(
    kit_config: MachineConfig, qemu_base: Path
) -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        async with QemuMachine(kit_config, base_dir=qemu_base, incoming="defer") as vm:
            assert vm.pid is not None
            ignored = _ignored(vm.pid)
    finally:
        signal.signal(signal.SIGINT, previous)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        assert not ignored & (1 << (sig - 1)), f"QEMU inherited {sig.name} ignored"
