"""`kvmkit vm` end to end against real QEMU: one VM through the virsh verbs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

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
        out = _ok(capsys, "start", "demo", "--disk", str(disk), "--quiet")
        assert "guest ready" in out and "accelerator" in out
        vm_dir = state / "vms" / "demo"
        assert vm_dir.stat().st_mode & 0o777 == 0o700
        assert {"config.json", "qmp.sock", "console.sock", "qemu.pid"} <= {
            p.name for p in vm_dir.iterdir()
        }
        status, _, err = _kvmkit(capsys, "start", "demo")
        assert status == 1 and "already running" in err

        rows = json.loads(_ok(capsys, "list", "--json"))
        assert [(r["name"], r["state"]) for r in rows] == [("demo", "running")]
        assert _ok(capsys, "console", "demo", "-c", "echo hello-$((6*7))").strip() == "hello-42"

        _ok(capsys, "suspend", "demo")
        assert json.loads(_ok(capsys, "list", "--json"))[0]["state"] == "paused"
        _ok(capsys, "resume", "demo")
        assert "balloon at 200 MiB" in _ok(capsys, "setmem", "demo", "200")

        _ok(capsys, "attach-disk", "demo", str(extra), "--id", "xd")
        wait_vdb = "for i in $(seq 100); do [ -e /sys/block/vdb ] && break; sleep 0.1; done"
        assert "vdb" in _ok(capsys, "console", "demo", "-c", f"{wait_vdb}; ls /sys/block")
        assert "DEVICE_DELETED" in _ok(capsys, "detach-disk", "demo", "xd")

        _ok(capsys, "console", "demo", "-c", "echo one > /tmp/s")
        _ok(capsys, "snapshot", "demo", "snap1")
        _ok(capsys, "console", "demo", "-c", "echo two > /tmp/s")
        _ok(capsys, "revert", "demo", "snap1")
        assert _ok(capsys, "console", "demo", "-c", "cat /tmp/s").strip() == "one"

        old_pid = int((vm_dir / "qemu.pid").read_text())
        stats = json.loads(_ok(capsys, "migrate", "demo", "--json"))
        assert stats["status"] == "completed" and stats["transferred_bytes"] > 0
        new_pid = int((vm_dir / "qemu.pid").read_text())
        assert new_pid != old_pid
        assert _ok(capsys, "console", "demo", "-c", "cat /tmp/s").strip() == "one"
        reply = json.loads(_ok(capsys, "qmp", "demo", "query-status"))
        assert reply["status"] == "running"
        status, _, err = _kvmkit(capsys, "qmp", "demo", "no-such-command")
        assert status == 1 and "no-such-command" in err

        # A QEMU that dies is shown as dead and can be cleaned up.
        os.kill(new_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while json.loads(_ok(capsys, "list", "--json"))[0]["state"] != "dead":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert "demo" in _ok(capsys, "cleanup")
        assert json.loads(_ok(capsys, "list", "--json"))[0]["state"] == "shut off"

        out = _ok(capsys, "clone", "demo", "demo2", "--linked")
        assert "linked clone" in out
        info = json.loads(_ok(capsys, "info", "demo2", "--json"))
        clone_disk = info["config"]["drives"][0]["path"]
        assert qemu_img.info(clone_disk)["backing-filename"] == str(disk)
        assert "full copy" in _ok(capsys, "clone", "demo", "demo3")
        full = json.loads(_ok(capsys, "info", "demo3", "--json"))["config"]["drives"][0]
        assert "backing-filename" not in qemu_img.info(full["path"])
        assert Path(full["path"]).parent == state / "vms" / "demo3"
        status, _, err = _kvmkit(capsys, "clone", "demo", "demo3")
        assert status == 1 and "already exists" in err
        _ok(capsys, "destroy", "demo3", "--undefine")
        _ok(capsys, "autostart", "demo2")
        assert json.loads(_ok(capsys, "list", "--json"))[1]["autostart"] is True

        status, _, err = _kvmkit(capsys, "start", "bad", "--kernel", "/nonexistent/kernel")
        assert status == 1 and "exit code 1" in err and "/nonexistent/kernel" in err
        assert [r["name"] for r in json.loads(_ok(capsys, "list", "--json"))] == ["demo", "demo2"]
        _ok(capsys, "destroy", "demo", "--undefine")
        _ok(capsys, "destroy", "demo2", "--undefine")
        assert json.loads(_ok(capsys, "list", "--json")) == []
    finally:
        for name in ("demo", "demo2"):
            main(["vm", "destroy", name, "--undefine"])
        shutil.rmtree(state, ignore_errors=True)
        disk.unlink(missing_ok=True)
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
        pid = int((vm_dir / "qemu.pid").read_text())
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
            while not any(vm_dir.glob("incoming-*/qmp.sock")):
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
        assert int((vm_dir / "qemu.pid").read_text()) == pid
        assert json.loads(_ok(capsys, "list", "--json"))[0]["state"] == "running"
        reply = json.loads(_ok(capsys, "qmp", "mig", "query-migrate"))
        assert reply["status"] == "cancelled"
        assert not list(vm_dir.glob("incoming-*"))
        assert _ok(capsys, "console", "mig", "-c", "echo still-here").strip() == "still-here"
    finally:
        main(["vm", "destroy", "mig", "--undefine"])
        shutil.rmtree(state, ignore_errors=True)
