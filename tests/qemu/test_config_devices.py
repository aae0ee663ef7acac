"""The command line for an install (CD-ROM, boot order), a VNC display and NICs with
MACs: pure, no QEMU started."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmkit.qemu.config import MachineConfig, Nic, build_command
from kvmkit.qemu.errors import QemuError


def _cmd(config: MachineConfig) -> list[str]:
    return build_command(
        config, accel="tcg", qmp_socket=Path("/r/q.sock"), console_socket=Path("/r/c.sock")
    )


def test_cdrom_goes_in_as_json_and_boots_first() -> None:
    iso = "/isos/a,file=/etc/shadow.iso"
    cmd = _cmd(MachineConfig(cdrom=iso, boot_order="d"))
    specs = [json.loads(cmd[i + 1]) for i, a in enumerate(cmd) if a == "-blockdev"]
    assert {
        "driver": "file",
        "filename": iso,
        "node-name": "cdrom0-file",
        "read-only": True,
    } in specs
    assert {
        "driver": "raw",
        "file": "cdrom0-file",
        "node-name": "cdrom0",
        "read-only": True,
    } in specs
    assert "ide-cd,drive=cdrom0,id=cdrom0" in cmd
    assert cmd[cmd.index("-boot") + 1] == "order=d"


def test_vnc_is_loopback_only_with_a_vga() -> None:
    cmd = _cmd(MachineConfig(display="vnc"))
    assert cmd[cmd.index("-vnc") + 1] == "127.0.0.1:0,to=99"
    assert "VGA,id=video0" in cmd
    assert "-vnc" not in _cmd(MachineConfig())


def test_nics_with_macs() -> None:
    cmd = _cmd(MachineConfig(nics=[Nic("52:54:00:00:00:01"), Nic("52:54:00:00:00:02")]))
    assert "user,id=nic-525400000001-net" in cmd
    assert (
        "virtio-net-pci,netdev=nic-525400000002-net,id=nic-525400000002,mac=52:54:00:00:00:02"
        in cmd
    )
    config = MachineConfig.from_json(MachineConfig(nics=[Nic("52:54:00:00:00:01")]).to_json())
    assert config.nics == [Nic("52:54:00:00:00:01")]


@pytest.mark.parametrize(
    ("config", "why"),
    [
        (MachineConfig(display="sdl"), "unknown display"),
        (MachineConfig(boot_order="c,menu=on"), "bad boot order"),
        (MachineConfig(machine="microvm", cdrom="/a.iso"), "microvm"),
        (MachineConfig(nics=[Nic("53:54:00:00:00:01")]), "bad MAC"),  # multicast
        (MachineConfig(nics=[Nic("52:54:00:00:00:01,x=y")]), "bad MAC"),
        (MachineConfig(nics=[Nic("52:54:00:00:00:01")] * 2), "unique"),
    ],
)
def test_refused(config: MachineConfig, why: str) -> None:
    with pytest.raises(QemuError, match=why):
        _cmd(config)
