"""The verbs that change only the definition, on a shut-off domain (no QEMU runs):
virsh's --config path, and the errors a shut-off domain gives for --live."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmkit.cli import main
from kvmkit.qemu import qemu_img


def _vm(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["vm", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def _ok(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    status, out, err = _vm(capsys, *argv)
    assert status == 0, err
    return out


@pytest.fixture
def defined(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Path:
    monkeypatch.setenv("KVMKIT_STATE_DIR", str(tmp_path / "state"))
    disk = tmp_path / "a.qcow2"
    qemu_img.create(disk, "4M")
    _ok(capsys, "define", "d", "--kernel", "/boot/none", "--memory", "1.5G", "--disk", str(disk))
    return tmp_path


def test_define_writes_the_documented_file(
    defined: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = json.loads(_ok(capsys, "dumpconfig", "d"))
    assert config["version"] == 1 and config["memory_mib"] == 1536
    assert config["disks"] == [
        {
            "source": str(defined / "a.qcow2"),
            "target": "vda",
            "format": "qcow2",
            "bus": "virtio",
            "readonly": False,
        }
    ]
    assert config["boot"] == {
        "kind": "kernel",
        "kernel": "/boot/none",
        "initrd": None,
        "append": None,
        "ready_marker": False,
    }
    assert config["display"] == "none"
    on_disk = json.loads((defined / "state/vms/d/definition.json").read_text())
    assert on_disk == config
    status, _, err = _vm(capsys, "define", "d", "--kernel", "/boot/none")
    assert status == 1 and "already exists" in err
    status, _, err = _vm(capsys, "start", "d", "--memory", "1G")
    assert status == 1 and "--memory would be ignored" in err


def test_memory_verbs_change_the_definition(
    defined: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "from the next start" in _ok(capsys, "setmem", "d", "1G")  # shut off: --config
    _ok(capsys, "setmem", "d", "768", "--config")
    assert json.loads(_ok(capsys, "dumpconfig", "d"))["current_memory_mib"] == 768
    status, _, err = _vm(capsys, "setmem", "d", "2G")
    assert status == 1 and "above the maximum memory" in err
    status, _, err = _vm(capsys, "setmem", "d", "512M", "--live")
    assert status == 1 and "not running" in err
    _ok(capsys, "setmaxmem", "d", "0.5G")  # below current: current follows
    config = json.loads(_ok(capsys, "dumpconfig", "d"))
    assert (config["memory_mib"], config["current_memory_mib"]) == (512, 512)
    info = json.loads(_ok(capsys, "dominfo", "d", "--json"))
    assert info["state"] == "shut off" and info["max_memory_mib"] == 512
    assert info["persistent"] is True and info["autostart"] is False and info["pid"] is None
    table = _ok(capsys, "dominfo", "d")
    assert "Max memory" in table and "512 MiB" in table and "shut off" in table


def test_disk_verbs_change_the_definition(
    defined: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = defined / "b.raw"
    qemu_img.create(extra, "1M", fmt="raw")
    _ok(capsys, "attach-disk", "d", str(extra), "--target", "vdc", "--subdriver", "raw")
    status, _, err = _vm(capsys, "attach-disk", "d", str(extra), "--target", "vdc")
    assert status == 1 and "vdc is already in use" in err
    status, _, err = _vm(capsys, "attach-disk", "d", str(defined / "none.img"))
    assert status == 1 and "not a regular file" in err
    status, _, err = _vm(capsys, "attach-disk", "d", str(extra), "--target", "sda")
    assert status == 2 and "bad disk target" in err
    rows = json.loads(_ok(capsys, "domblklist", "d", "--json"))
    assert [(r["target"], r["source"]) for r in rows] == [
        ("vda", str(defined / "a.qcow2")),
        ("vdc", str(extra)),
    ]
    assert "vdc" in _ok(capsys, "domblklist", "d")  # the table
    _ok(capsys, "detach-disk", "d", "--source", str(extra), "--persistent")
    _ok(capsys, "detach-disk", "d", "vda")
    assert json.loads(_ok(capsys, "domblklist", "d", "--json")) == []
    status, _, err = _vm(capsys, "detach-disk", "d", "vdz")
    assert status == 1 and "no disk with target vdz" in err
    status, _, err = _vm(capsys, "attach-disk", "d", str(extra), "--live")
    assert status == 1 and "not running" in err


def test_clone_copies_the_definition_and_undefine_removes_it(
    defined: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _ok(capsys, "autostart", "d")
    _ok(capsys, "clone", "d", "e", "--linked")
    source, clone = (json.loads(_ok(capsys, "dumpconfig", n)) for n in ("d", "e"))
    assert clone["name"] == "e" and clone["autostart"] is False
    assert clone["memory_mib"] == source["memory_mib"] and clone["boot"] == source["boot"]
    overlay = clone["disks"][0]["source"]
    assert Path(overlay).parent == defined / "state/vms/e"
    assert qemu_img.info(overlay)["backing-filename"] == str(defined / "a.qcow2")
    names = [r["name"] for r in json.loads(_ok(capsys, "list", "--json"))]
    assert names == ["d", "e"]
    _ok(capsys, "undefine", "e")
    assert not (defined / "state/vms/e").exists()
    status, _, err = _vm(capsys, "dominfo", "e")
    assert status == 1 and "no domain named e" in err
    status, _, err = _vm(capsys, "dominfo", "bad\nname")
    assert status == 2 and len(err.strip().splitlines()) == 1
