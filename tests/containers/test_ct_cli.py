"""``kvmkit ct`` end to end on real LXC: the issue's chain, --json on every verb, the errors
as a user sees them, and the console on a real pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmkit.cli import main
from kvmkit.containers import Container

MakeContainer = Callable[..., Container]


def _ct(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["ct", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_done_when_chain(
    capsys: pytest.CaptureFixture[str], make_container: MakeContainer, lxcpath: Path
) -> None:
    """kvmkit ct create t1 && start && attach -- uname -r && info --json && stop && destroy"""
    name = make_container("chain", create=False).name
    at = ("--lxcpath", str(lxcpath))
    assert _ct(capsys, "create", name, *at)[:2] == (
        0,
        f"container {name} created (busybox, none)\n",
    )
    status, out, _ = _ct(capsys, "start", name, *at)
    assert status == 0 and out.startswith(f"container {name} started: init pid ")
    assert _ct(capsys, "attach", name, *at, "--", "uname", "-r")[:2] == (
        0,
        os.uname().release + "\n",
    )
    status, out, _ = _ct(capsys, "info", name, "--json", *at)
    info = json.loads(out)
    assert status == 0 and info["state"] == "RUNNING" and info["pid"] > 1
    assert info["memory_bytes"] > 0 and info["network"] == "none" and info["ips"] == []
    status, out, _ = _ct(capsys, "info", name, *at)
    assert status == 0 and "RUNNING" in out and "MiB" in out
    status, out, _ = _ct(capsys, "list", *at)
    assert status == 0 and name in out and "RUNNING" in out
    assert _ct(capsys, "stop", name, *at)[:2] == (0, f"container {name} stopped\n")
    assert _ct(capsys, "destroy", name, *at)[:2] == (0, f"container {name} destroyed\n")
    assert _ct(capsys, "list", "--json", *at)[:2] == (0, "[]\n")


def test_json_on_every_verb(
    capsys: pytest.CaptureFixture[str], make_container: MakeContainer, lxcpath: Path
) -> None:
    name = make_container("json", create=False).name
    at = ("--lxcpath", str(lxcpath), "--json")

    def js(*argv: str) -> object:
        status, out, err = _ct(capsys, *argv)
        assert status == 0, err
        return json.loads(out)

    assert js("create", name, "--network", "veth", *at)["state"] == "STOPPED"  # type: ignore[index]
    started = js("start", name, *at)
    assert started["state"] == "RUNNING" and started["ips"][0].startswith("10.254.")  # type: ignore[index]
    attached = js("attach", name, *at, "--", "sh", "-c", "echo hi; exit 0")
    assert attached == {
        "name": name,
        "command": ["sh", "-c", "echo hi; exit 0"],
        "status": 0,
        "output": "hi\n",
    }
    assert js("info", name, *at)["veth"].startswith("kkv")  # type: ignore[index]
    assert [c["name"] for c in js("list", *at)] == [name]  # type: ignore[union-attr,index]
    deadline = time.monotonic() + 10
    while "Please press Enter" not in js("console", name, "--log", *at)["console_log"]:  # type: ignore[index]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert js("stop", name, "--kill", *at)["state"] == "STOPPED"  # type: ignore[index]
    assert js("destroy", name, *at) == {"name": name, "destroyed": True}


def test_attach_exit_status_is_the_commands(
    capsys: pytest.CaptureFixture[str], make_container: MakeContainer, lxcpath: Path
) -> None:
    ct = make_container("status", start=True)
    status, out, _ = _ct(
        capsys, "attach", ct.name, "--lxcpath", str(lxcpath), "--", "sh", "-c", "echo x; exit 7"
    )
    assert (status, out) == (7, "x\n")


def test_errors_say_what_to_do(
    capsys: pytest.CaptureFixture[str], make_container: MakeContainer, lxcpath: Path
) -> None:
    ct = make_container("errs")
    at = ("--lxcpath", str(lxcpath))
    cases = [
        (("create", ct.name), "already exists", "kvmkit ct destroy"),
        (("create", ct.name + "x", "--template", "nope"), "no template 'nope'", "busybox"),
        (("info", ct.name + "x"), "no container", "kvmkit ct create"),
        (("attach", ct.name, "--", "true"), "is not running", "kvmkit ct start"),
        (("attach", ct.name, "--"), "no command given", "-- uname -r"),
        (("stop", ct.name), "is not running", ""),
        (("create", "bad/name"), "invalid container name", "letters"),
    ]
    for argv, what, todo in cases:
        status, out, err = _ct(capsys, argv[0], *at, *argv[1:])
        assert status == 1 and out == "", argv
        assert err.startswith("kvmkit ct: error: ") and what in err and todo in err, (argv, err)
        assert "Traceback" not in err


def test_console_on_a_terminal(make_container: MakeContainer, lxcpath: Path) -> None:
    """lxc-console on a real pty: getty's login prompt on tty1, Ctrl-a q leaves."""
    ct = make_container("console", start=True)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmkit", "ct", "console", ct.name, "--lxcpath", str(lxcpath)],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    seen = b""

    def read_until(marker: bytes, limit_s: float = 20.0) -> None:
        nonlocal seen
        deadline = time.monotonic() + limit_s
        while marker not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    return

    try:
        read_until(b"Ctrl+a q")
        os.write(master, b"\r")
        read_until(b"login:")
        assert f"{ct.name} login:".encode() in seen, seen[-400:]
        os.write(master, b"\x01q")
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_console_without_a_terminal(
    capsys: pytest.CaptureFixture[str], make_container: MakeContainer, lxcpath: Path
) -> None:
    ct = make_container("noterm", start=True)
    status, _, err = _ct(capsys, "console", ct.name, "--lxcpath", str(lxcpath))
    assert status == 1 and "needs a terminal" in err and "attach" in err
