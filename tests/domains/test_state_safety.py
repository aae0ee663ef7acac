"""The state store never signals a process kvmkit did not start, never trusts a state
file it cannot read, and never leaves half a file behind."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import trio

from kvmkit.cli import main
from kvmkit.domains import Boot, Definition, Domain, DomainStore, UntrustedStateError, define
from kvmkit.domains.process import Identity, find
from kvmkit.domains.store import RunState, atomic_write_json
from kvmkit.qemu.config import MachineConfig


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DomainStore:
    monkeypatch.setenv("KVMKIT_STATE_DIR", str(tmp_path))
    return DomainStore(tmp_path)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated live process (a `sleep` this test owns and ends)."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


def _define(store: DomainStore, name: str = "d") -> Domain:
    return define(Definition(name, boot=Boot("kernel", "/nonexistent/k")), store)


def _record(store: DomainStore, name: str, identity: Identity) -> None:
    (store.folder(name) / "run-1").mkdir()
    state = RunState(identity, "run-1", MachineConfig(name=name), "tcg")
    store.write_state(name, state)


def _qemu_like(pid: int, *, started_earlier_by: float = 100.0) -> Identity:
    """What the state file said: a QEMU with this PID, started before the PID's owner."""
    real = psutil.Process(pid).create_time()
    return Identity(pid, real - started_earlier_by, ("qemu-system-x86_64", "-name", "d"))


def test_stale_pid_never_signals_the_unrelated_process(
    store: DomainStore, sleeper: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    dom = _define(store)
    _record(store, "d", _qemu_like(sleeper.pid))
    assert trio.run(dom.state) == "dead"
    assert "not running" in trio.run(dom.destroy)
    assert sleeper.poll() is None  # the sleep survives
    assert store.read_state("d") is None  # and the stale record is gone
    # The same through the command line, for destroy and shutdown.
    for verb in ("destroy", "shutdown"):
        _record(store, "d", _qemu_like(sleeper.pid))
        assert main(["vm", verb, "d"]) == 0
        assert "not running" in capsys.readouterr().out
        assert sleeper.poll() is None


def test_same_start_time_but_other_command_line_is_not_trusted(
    store: DomainStore, sleeper: subprocess.Popen[bytes]
) -> None:
    dom = _define(store)
    real = psutil.Process(sleeper.pid).create_time()
    _record(store, "d", Identity(sleeper.pid, real, ("qemu-system-x86_64", "-S")))
    assert "not running" in trio.run(dom.destroy)
    assert sleeper.poll() is None


def test_a_verified_process_is_stopped_through_the_ladder(
    store: DomainStore, sleeper: subprocess.Popen[bytes]
) -> None:
    dom = _define(store)
    _record(store, "d", Identity.of(sleeper.pid))
    assert dom.is_active()
    # No QMP socket: the ladder goes straight to the signals, through the pidfd.
    assert trio.run(dom.destroy) == "SIGTERM"
    assert sleeper.wait(timeout=10) is not None  # (kvmkit reaped its own child)
    assert not psutil.pid_exists(sleeper.pid)
    assert store.read_state("d") is None and not (store.folder("d") / "run-1").exists()


def test_find_refuses_exited_processes() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    identity = Identity.of(proc.pid)
    proc.kill()
    proc.wait()
    assert find(identity) is None


@pytest.mark.parametrize(
    "content",
    [
        '{"version": 1, "pid": 12',  # half written
        "",
        "not json",
        '{"version": 1, "pid": "12", "create_time": 1, "cmdline": ["q"], "run_dir": "run-1"}',
        '{"version": 1, "pid": 12, "create_time": 1, "cmdline": ["q"], "run_dir": "../x"}',
        '{"version": 1, "pid": 12, "create_time": 1, "cmdline": ["q"], "run_dir": "run-1"}',
        '{"version": 7, "pid": 12}',
    ],
)
def test_untrusted_state_stops_start_and_destroy(
    store: DomainStore, content: str, capsys: pytest.CaptureFixture[str]
) -> None:
    dom = _define(store)
    (store.folder("d") / "state.json").write_text(content)
    with pytest.raises(UntrustedStateError):
        trio.run(lambda: dom.start(wait_ready=0))
    assert main(["vm", "start", "d"]) == 1
    err = capsys.readouterr().err
    assert "cannot be trusted" in err and len(err.strip().splitlines()) == 1
    assert main(["vm", "destroy", "d"]) == 1
    capsys.readouterr()
    assert main(["vm", "list", "--json"]) == 0  # the list still works, and says so
    assert json.loads(capsys.readouterr().out)[0]["state"] == "untrusted state"
    assert not list(store.folder("d").glob("run-*"))  # no QEMU was started
    assert store.exists("d")  # and the definition is kept


def test_state_writable_by_others_is_not_trusted(
    store: DomainStore, sleeper: subprocess.Popen[bytes]
) -> None:
    _define(store)
    _record(store, "d", Identity.of(sleeper.pid))
    os.chmod(store.folder("d") / "state.json", 0o666)
    with pytest.raises(UntrustedStateError, match="others can write"):
        store.read_state("d")


def test_a_crash_mid_write_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.json"
    atomic_write_json(path, {"n": 1})

    def crash(src: str, dst: str) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        atomic_write_json(path, {"n": 2, "big": "x" * 100_000})
    assert json.loads(path.read_text()) == {"n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left


def test_undefine_refuses_a_running_domain(
    store: DomainStore, sleeper: subprocess.Popen[bytes]
) -> None:
    dom = _define(store)
    _record(store, "d", Identity.of(sleeper.pid))
    with pytest.raises(Exception, match="running"):
        dom.undefine()
    assert store.exists("d")


def test_a_qemu_no_state_records_stops_start(store: DomainStore) -> None:
    """kvmkit died between launching QEMU and recording it: the run folder's QMP socket
    still answers, so start refuses instead of launching a second QEMU."""
    import socket

    dom = _define(store)
    run = store.folder("d") / "run-1"
    run.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(run / "qmp.sock"))
        listener.listen()
        with pytest.raises(UntrustedStateError, match="no state file records"):
            trio.run(lambda: dom.start(wait_ready=0))
    # Once nothing answers there, the stale folder is simply removed.
    assert store.new_run_dir("d").parent == store.folder("d")
    assert not run.exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_api_timeouts_are_checked(store: DomainStore, bad: float) -> None:
    from kvmkit.domains import DefinitionError

    dom = _define(store)
    with pytest.raises(DefinitionError):
        trio.run(lambda: dom.shutdown(timeout=bad))
    with pytest.raises(DefinitionError):
        trio.run(lambda: dom.start(wait_ready=bad))


def test_start_forgets_a_stale_record_then_launches(
    store: DomainStore, sleeper: subprocess.Popen[bytes], qemu_binary: str
) -> None:
    """A record of a QEMU that is gone (its PID now another process's) does not block
    start: it is forgotten, and QEMU is launched (here it fails at once: no kernel)."""
    from kvmkit.qemu.errors import LaunchError

    dom = _define(store)
    _record(store, "d", _qemu_like(sleeper.pid))
    with pytest.raises(LaunchError, match="/nonexistent/k"):
        trio.run(lambda: dom.start(wait_ready=0))
    assert sleeper.poll() is None
    assert store.read_state("d") is None
    assert not list(store.folder("d").glob("run-*"))
