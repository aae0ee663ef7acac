"""`kvmkit vm setvcpus`, `attach-interface`/`detach-interface`/`domiflist` against a real
QEMU guest, checked inside the guest (/sys/devices/system/cpu/online, /sys/class/net)
and in the definition across a restart."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kvmkit.cli import main


def _vm(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["vm", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def _ok(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    status, out, err = _vm(capsys, *argv)
    assert status == 0, f"kvmkit vm {' '.join(argv)} failed: {err}"
    return out


def _guest(capsys: pytest.CaptureFixture[str], command: str) -> str:
    return _ok(capsys, "console", "hp", "-c", command).strip()


MAC = "52:54:00:ab:cd:01"


def test_vcpus_and_interfaces(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    qemu_base: Path,
    guest_kit: object,
) -> None:
    state = qemu_base / "hp-state"
    monkeypatch.setenv("KVMKIT_STATE_DIR", str(state))
    try:
        _ok(capsys, "start", "hp", "--cpus", "1", "--maxcpus", "3", "--quiet")
        assert _guest(capsys, "cat /sys/devices/system/cpu/online") == "0"

        assert "2 vCPUs online" in _ok(capsys, "setvcpus", "hp", "2")
        assert _guest(capsys, "cat /sys/devices/system/cpu/online") == "0-1"
        assert json.loads(_ok(capsys, "dominfo", "hp", "--json"))["cpus"] == 2
        status, _, err = _vm(capsys, "setvcpus", "hp", "4", "--live")
        assert status == 1 and "maximum of 3" in err
        status, _, err = _vm(capsys, "setvcpus", "hp", "1", "--live")  # QEMU 7.2 TCG
        assert status != 0 and "refusing to unplug" in err and "TCG" in err
        assert _guest(capsys, "cat /sys/devices/system/cpu/online") == "0-1"  # untouched
        _ok(capsys, "setvcpus", "hp", "3", "--config")
        status, _, err = _vm(capsys, "setvcpus", "hp", "5", "--config")
        assert status == 1 and "--maximum" in err

        before = _guest(capsys, "ls /sys/class/net")
        _ok(capsys, "attach-interface", "hp", "--type", "user", "--model", "virtio",
            "--mac", MAC, "--persistent")  # fmt: skip
        assert MAC in _guest(capsys, "cat /sys/class/net/*/address")
        assert len(_guest(capsys, "ls /sys/class/net").split()) == len(before.split()) + 1
        status, _, err = _vm(capsys, "attach-interface", "hp", "--mac", MAC, "--live")
        assert status == 1 and "already" in err
        status, _, err = _vm(capsys, "attach-interface", "hp", "--mac", "01:00:00:00:00:01")
        assert status != 0 and "unicast" in err
        listed = json.loads(_ok(capsys, "domiflist", "hp", "--json"))
        assert [n["mac"] for n in listed] == [MAC]

        # A local migration carries the hot-added CPU and NIC along (the destination
        # plugs them before the state arrives, or it refuses the stream).
        assert "completed" in _ok(capsys, "migrate", "hp")
        assert _guest(capsys, "cat /sys/devices/system/cpu/online") == "0-1"
        assert MAC in _guest(capsys, "cat /sys/class/net/*/address")
        assert json.loads(_ok(capsys, "dominfo", "hp", "--json"))["cpus"] == 2

        # Restart: the definition has 3 vCPUs and the NIC.
        _ok(capsys, "destroy", "hp")
        _ok(capsys, "start", "hp", "--quiet")
        assert _guest(capsys, "cat /sys/devices/system/cpu/online") == "0-2"
        assert MAC in _guest(capsys, "cat /sys/class/net/*/address")

        _ok(capsys, "detach-interface", "hp", "--type", "user", "--mac", MAC, "--persistent")
        wait_gone = f"for i in $(seq 50); do grep -q {MAC} /sys/class/net/*/address || break; sleep 0.1; done"
        assert MAC not in _guest(capsys, f"{wait_gone}; cat /sys/class/net/*/address")
        assert json.loads(_ok(capsys, "dumpconfig", "hp"))["nics"] == []
        status, _, err = _vm(capsys, "detach-interface", "hp", "--mac", MAC)
        assert status == 1 and "no NIC" in err
    finally:
        main(["vm", "destroy", "hp", "--undefine"])
        capsys.readouterr()
        shutil.rmtree(state, ignore_errors=True)
