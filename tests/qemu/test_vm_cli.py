"""`kvmkit vm` end to end against real QEMU: one VM through the virsh verbs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from kvmkit.cli import main
from kvmkit.qemu import qemu_img


def _kvmkit(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["vm", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def _ok(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    status, out, err = _kvmkit(capsys, *argv)
    assert status == 0, f"kvmkit vm {' '.join(argv)} failed: {err}"
    return out


def _state(vm_dir: Path) -> dict[str, Any]:
    return dict(json.loads((vm_dir / "state.json").read_text()))


def test_vm_cli_lifecycle(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    qemu_base: Path,
    guest_kit: object,
) -> None:
    state = qemu_base / "cli-state"
    monkeypatch.setenv("KVMKIT_STATE_DIR", str(state))
    disk = qemu_base / "cli-disk.qcow2"
    extra = qemu_base / "cli-extra.raw"
    qemu_img.create(disk, "32M")
    qemu_img.create(extra, "8M", fmt="raw")
    try:
        out = _ok(capsys, "start", "demo", "--disk", str(disk), "--memory", "256M", "--quiet")
        assert "guest ready" in out and "accelerator" in out
        vm_dir = state / "vms" / "demo"
        assert vm_dir.stat().st_mode & 0o777 == 0o700
        assert {"definition.json", "state.json"} <= {p.name for p in vm_dir.iterdir()}
        run_dir = vm_dir / _state(vm_dir)["run_dir"]
        assert {"qmp.sock", "console.sock"} <= {p.name for p in run_dir.iterdir()}
        status, _, err = _kvmkit(capsys, "start", "demo")
        assert status == 1 and "already running" in err

        rows = json.loads(_ok(capsys, "list", "--json"))
        assert [(r["name"], r["state"]) for r in rows] == [("demo", "running")]
        assert "demo" in _ok(capsys, "list")  # the table
        assert _ok(capsys, "console", "demo", "-c", "echo hello-$((6*7))").strip() == "hello-42"

        _ok(capsys, "suspend", "demo")
        assert json.loads(_ok(capsys, "list", "--json"))[0]["state"] == "paused"
        _ok(capsys, "resume", "demo")
        assert "balloon at 200 MiB" in _ok(capsys, "setmem", "demo", "200")  # bare: MiB
        assert "balloon at 192 MiB" in _ok(capsys, "setmem", "demo", "192M", "--live")
        info = json.loads(_ok(capsys, "dominfo", "demo", "--json"))
        assert info["used_memory_mib"] == 192 and info["max_memory_mib"] == 256
        assert info["state"] == "running" and info["persistent"] is True

        _ok(capsys, "attach-disk", "demo", str(extra), "--target", "vdb")
        wait_vdb = (
            "for i in $(seq 100); do grep -qx vdb /sys/block/vd*/serial && break; sleep 0.1; done"
        )
        assert "vdb" in _ok(
            capsys, "console", "demo", "-c", f"{wait_vdb}; cat /sys/block/vd*/serial"
        )
        listed = json.loads(_ok(capsys, "domblklist", "demo", "--json"))
        assert [(d["target"], d["source"]) for d in listed] == [
            ("vda", str(disk)),
            ("vdb", str(extra)),
        ]
        # virsh's form: the disk named by its source path.
        assert "vdb detached" in _ok(capsys, "detach-disk", "demo", "--source", str(extra))
        assert [d["target"] for d in json.loads(_ok(capsys, "domblklist", "demo", "--json"))] == [
            "vda"
        ]

        _ok(capsys, "console", "demo", "-c", "echo one > /tmp/s")
        _ok(capsys, "snapshot", "demo", "snap1")
        assert [
            s["name"] for s in json.loads(_ok(capsys, "snapshot", "demo", "--list", "--json"))
        ] == ["snap1"]
        _ok(capsys, "console", "demo", "-c", "echo two > /tmp/s")
        _ok(capsys, "revert", "demo", "snap1")
        assert _ok(capsys, "console", "demo", "-c", "cat /tmp/s").strip() == "one"

        old = _state(vm_dir)
        stats = json.loads(_ok(capsys, "migrate", "demo", "--json"))
        assert stats["status"] == "completed" and stats["transferred_bytes"] > 0
        new = _state(vm_dir)
        assert new["pid"] != old["pid"] and new["run_dir"] != old["run_dir"]
        assert not (vm_dir / old["run_dir"]).exists()  # the old QEMU and its sockets are gone
        assert _ok(capsys, "console", "demo", "-c", "cat /tmp/s").strip() == "one"
        reply = json.loads(_ok(capsys, "qmp", "demo", "query-status"))
        assert reply["status"] == "running"
        status, _, err = _kvmkit(capsys, "qmp", "demo", "no-such-command")
        assert status == 1 and "no-such-command" in err

        # A QEMU that dies is shown as dead and can be cleaned up.
        os.kill(new["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while json.loads(_ok(capsys, "list", "--json"))[0]["state"] != "dead":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert "demo" in _ok(capsys, "cleanup")
        assert json.loads(_ok(capsys, "list", "--json"))[0]["state"] == "shut off"

        out = _ok(capsys, "clone", "demo", "demo2", "--linked")
        assert "linked clone" in out
        clone_disk = json.loads(_ok(capsys, "dumpconfig", "demo2"))["disks"][0]["source"]
        assert qemu_img.info(clone_disk)["backing-filename"] == str(disk)
        assert "full copy" in _ok(capsys, "clone", "demo", "demo3")
        full = json.loads(_ok(capsys, "dumpconfig", "demo3"))
        assert full["name"] == "demo3" and full["memory_mib"] == 256
        assert "backing-filename" not in qemu_img.info(full["disks"][0]["source"])
        assert Path(full["disks"][0]["source"]).parent == state / "vms" / "demo3"
        status, _, err = _kvmkit(capsys, "clone", "demo", "demo3")
        assert status == 1 and "already exists" in err
        _ok(capsys, "destroy", "demo3", "--undefine")
        _ok(capsys, "autostart", "demo2")
        assert json.loads(_ok(capsys, "list", "--json"))[1]["autostart"] is True

        status, _, err = _kvmkit(capsys, "start", "bad", "--kernel", "/nonexistent/kernel")
        assert status == 1 and "exit code 1" in err and "/nonexistent/kernel" in err
        assert [r["name"] for r in json.loads(_ok(capsys, "list", "--json"))] == ["demo", "demo2"]
        _ok(capsys, "destroy", "demo", "--undefine")
        _ok(capsys, "undefine", "demo2")
        assert json.loads(_ok(capsys, "list", "--json")) == []
    finally:
        for name in ("demo", "demo2", "demo3"):
            main(["vm", "destroy", name, "--undefine"])
        shutil.rmtree(state, ignore_errors=True)
        disk.unlink(missing_ok=True)
        extra.unlink(missing_ok=True)


def _mem_total_mib(capsys: pytest.CaptureFixture[str], name: str) -> int:
    out = _ok(capsys, "console", name, "-c", "free -m | grep Mem:")
    return int(out.split()[1])


def test_persistent_definitions_survive_a_restart(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    qemu_base: Path,
    guest_kit: object,
) -> None:
    """virsh's --config and --persistent: setmem --config, setmaxmem and attach-disk
    --persistent change the definition, and the next start gives the guest exactly that."""
    state = qemu_base / "cli-state-persist"
    monkeypatch.setenv("KVMKIT_STATE_DIR", str(state))
    extra = qemu_base / "cli-persist.raw"
    qemu_img.create(extra, "8M", fmt="raw")
    try:
        _ok(capsys, "start", "p", "--memory", "0.25G", "--quiet")
        before = _mem_total_mib(capsys, "p")
        # Max memory 320 MiB from the next start; 160 MiB of it given to the guest.
        _ok(capsys, "setmaxmem", "p", "320")
        assert "from the next start" in _ok(capsys, "setmem", "p", "160M", "--config")
        _ok(capsys, "attach-disk", "p", str(extra), "--target", "vdb", "--persistent")
        definition = json.loads(_ok(capsys, "dumpconfig", "p"))
        assert definition["memory_mib"] == 320 and definition["current_memory_mib"] == 160
        assert [d["target"] for d in definition["disks"]] == ["vdb"]
        assert _mem_total_mib(capsys, "p") == before  # --config leaves the running guest
        info = json.loads(_ok(capsys, "dominfo", "p", "--json"))
        assert info["max_memory_mib"] == 256  # what runs now

        _ok(capsys, "shutdown", "p")
        # The restart is autostart's, as at host boot.
        _ok(capsys, "autostart", "p")
        assert json.loads(_ok(capsys, "dominfo", "p", "--json"))["autostart"] is True
        assert "started 1 domain(s) p" in _ok(capsys, "autostart", "--run", "--wait", "60")
        after = _mem_total_mib(capsys, "p")
        # 64 MiB more RAM, 160 MiB ballooned away: 96 MiB less than before.
        assert abs((before - after) - 96) <= 12, (before, after)
        serials = _ok(
            capsys, "console", "p", "-c", "cat /sys/block/vd*/serial; echo; ls /sys/block"
        )
        assert "vdb" in serials
        info = json.loads(_ok(capsys, "dominfo", "p", "--json"))
        assert info["max_memory_mib"] == 320 and abs(info["used_memory_mib"] - 160) <= 2

        # The console log is the domain's: both boots are in it.
        log = (state / "vms" / "p" / "console.log").read_text(errors="replace")
        assert log.count("KVMKIT-GUEST-READY") == 2
        _ok(capsys, "detach-disk", "p", "--source", str(extra), "--persistent")
        assert json.loads(_ok(capsys, "dumpconfig", "p"))["disks"] == []
        assert json.loads(_ok(capsys, "domblklist", "p", "--json")) == []
        _ok(capsys, "destroy", "p", "--undefine")
    finally:
        main(["vm", "destroy", "p", "--undefine"])
        shutil.rmtree(state, ignore_errors=True)
        extra.unlink(missing_ok=True)


def test_vm_migrate_interrupted_by_ctrl_c_keeps_the_source(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    qemu_base: Path,
    guest_kit: object,
) -> None:
    import subprocess
    import sys

    state = qemu_base / "cli-state-sigint"
    monkeypatch.setenv("KVMKIT_STATE_DIR", str(state))
    try:
        _ok(capsys, "start", "mig", "--quiet")
        vm_dir = state / "vms" / "mig"
        pid = _state(vm_dir)["pid"]
        # Keep dirtying memory so that a 4 MiB/s migration cannot finish.
        _ok(
            capsys,
            "console",
            "mig",
            "-c",
            "(dd if=/dev/urandom of=/tmp/r bs=1M count=16 2>/dev/null; while true; do "
            "dd if=/tmp/r of=/tmp/d bs=1M conv=notrunc 2>/dev/null; done) >/dev/null 2>&1 &",
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvmkit", "vm", "migrate", "mig", "--bandwidth", "4"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        try:
            deadline = time.monotonic() + 30
            while len(list(vm_dir.glob("run-*/qmp.sock"))) < 2:  # the destination's
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
            time.sleep(2.0)  # migrating now
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 130, err
        assert "interrupted" in err
        # The source kept running, the migration is cancelled, the half-made destination
        # is gone.
        assert _state(vm_dir)["pid"] == pid
        assert json.loads(_ok(capsys, "list", "--json"))[0]["state"] == "running"
        reply = json.loads(_ok(capsys, "qmp", "mig", "query-migrate"))
        assert reply["status"] == "cancelled"
        assert len(list(vm_dir.glob("run-*"))) == 1
        assert _ok(capsys, "console", "mig", "-c", "echo still-here").strip() == "still-here"
    finally:
        main(["vm", "destroy", "mig", "--undefine"])
        shutil.rmtree(state, ignore_errors=True)
