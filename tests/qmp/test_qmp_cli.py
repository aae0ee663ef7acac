"""``kvmkit qmp`` as a user runs it: a subprocess against a real QEMU."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvmkit.commands.qmp import parse_address
from kvmkit.qmp import DisconnectedError
from kvmkit.qmp.sync import connect

REPO = Path(__file__).resolve().parents[2]


def kvmkit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmkit", "qmp", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


class LineReader:
    """Reads lines from a pipe with a timeout (no hidden buffering, unlike TextIOWrapper)."""

    def __init__(self, stream: Any) -> None:
        self.fd = stream.fileno()
        self.buf = b""

    def line(self, timeout: float = 20.0) -> str:
        while b"\n" not in self.buf:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            assert ready, "no output in time"
            chunk = os.read(self.fd, 65536)
            assert chunk, "the process closed its output"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


def test_parse_address() -> None:
    assert parse_address("/run/q.sock") == "/run/q.sock"
    assert parse_address("unix:q.sock") == "q.sock"
    assert parse_address("localhost:4444") == ("localhost", 4444)
    assert parse_address("tcp:127.0.0.1:5") == ("127.0.0.1", 5)
    assert parse_address("[::1]:4444") == ("::1", 4444)
    assert parse_address("q.sock") == "q.sock"


def test_command_prints_reply_as_json(qemu: Any) -> None:
    done = kvmkit(str(qemu.socket), "query-status")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"status": "prelaunch", "singlestep": False, "running": False}
    done = kvmkit(str(qemu.socket), "qom-get", '{"path": "/machine", "property": "type"}')
    assert json.loads(done.stdout) == "none-machine"


def test_command_errors_are_one_line(qemu: Any, tmp_path: Path) -> None:
    done = kvmkit(str(qemu.socket), "no-such-command")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "kvmkit qmp: error: no-such-command failed: CommandNotFound: "
        "The command no-such-command has not been found"
    ]
    done = kvmkit(str(qemu.socket), "qom-get", "{bad json")
    assert done.returncode == 1 and "not valid JSON" in done.stderr
    done = kvmkit(str(tmp_path / "none.sock"), "query-status")
    assert done.returncode == 1 and "cannot connect" in done.stderr
    assert "Traceback" not in done.stderr
    done = kvmkit(str(qemu.socket), "qom-gett", "--validate")
    assert done.returncode == 1 and "did you mean qom-get" in done.stderr


def test_events_follow_until_interrupted(qemu: Any) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmkit", "qmp", str(qemu.socket), "--events", "STOP", "RESUME"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = LineReader(proc.stdout), LineReader(proc.stderr)
    try:
        assert "following events" in err.line()
        with connect(qemu.sockets[1]) as qmp:
            qmp.execute("cont")
            qmp.execute("query-name")  # not an event: not printed
            qmp.execute("stop")
        first = json.loads(out.line())
        second = json.loads(out.line())
        assert (first["event"], second["event"]) == ("RESUME", "STOP")
        assert "timestamp" in first
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_events_end_when_qemu_quits(qemu: Any) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmkit", "qmp", str(qemu.socket), "--events", "STOP", "SHUTDOWN"]
        + ["--match", '{"reason": "host-qmp-quit"}'],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = LineReader(proc.stdout), LineReader(proc.stderr)
    try:
        assert "following events" in err.line()
        with connect(qemu.sockets[1]) as qmp:
            qmp.execute("cont")
            qmp.execute("stop")  # STOP has no "reason": filtered out by --match
            # QEMU may exit before its reply is read; the events say it quit.
            with contextlib.suppress(DisconnectedError):
                qmp.execute("quit")
        shutdown = json.loads(out.line())
        assert shutdown["event"] == "SHUTDOWN"
        assert shutdown["data"]["reason"] == "host-qmp-quit"
        assert "closed the connection" in err.line()
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_usage_errors() -> None:
    done = kvmkit("/nonexistent.sock")
    assert done.returncode == 1 and "missing COMMAND" in done.stderr
    done = kvmkit("/nonexistent.sock", "query-status", "--events")
    assert done.returncode == 1 and "not both" in done.stderr


@pytest.mark.parametrize("flag", ["--help"])
def test_help(flag: str) -> None:
    done = kvmkit(flag)
    assert done.returncode == 0 and "--events" in done.stdout


@pytest.mark.parametrize("value", ["nan", "-1", "inf"])
def test_absurd_timeouts_get_a_one_line_error(value: str, tmp_path: Path) -> None:
    for option in ("--connect-timeout", "--timeout"):
        done = kvmkit(str(tmp_path / "none.sock"), "query-status", f"{option}={value}")
        assert done.returncode != 0
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "finite, non-negative number of seconds" in lines[0], lines
        assert "Traceback" not in done.stderr
