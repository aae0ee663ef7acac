"""Per-user state for ``kvmkit vm``: one folder per VM with its configuration, QMP and
console sockets, logs and pid, guarded by a lock file.

Layout of ``<state>/vms/<name>/`` (``<state>`` is ``$KVMKIT_STATE_DIR``, else
``$XDG_STATE_HOME/kvmkit``, else ``~/.local/state/kvmkit``; folders are ``0700``)::

    config.json     MachineConfig            autostart      present when autostart is on
    qemu.pid        pid of the running QEMU  qmp.sock       QMP monitor
    console.sock    serial console           console.log    everything the guest printed
    qemu.log        QEMU's stdout/stderr     lock           flock()ed by every mutating command
    hotplug.json    disks attached at run time

QEMU runs detached (its own session) and outlives the ``kvmkit`` command that started it.
A VM whose QEMU died shows as ``dead`` until :meth:`VmStore.cleanup` removes the stale
runtime files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from kvmkit.qemu.accel import choose_accel
from kvmkit.qemu.config import MachineConfig, build_command
from kvmkit.qemu.errors import LaunchError, VmStateError
from kvmkit.qmp import QMPClient, open_qmp

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RUNTIME_FILES = ("qemu.pid", "qmp.sock", "console.sock", "hotplug.json")


def state_root() -> Path:
    if env := os.environ.get("KVMKIT_STATE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "kvmkit"


def _pid_alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class VmRecord:
    """One VM folder."""

    name: str
    directory: Path

    def path(self, name: str) -> Path:
        return self.directory / name

    @property
    def config(self) -> MachineConfig:
        try:
            return MachineConfig.from_json(json.loads(self.path("config.json").read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise VmStateError(f"VM {self.name} has no readable config.json: {exc}") from exc

    def save_config(self, config: MachineConfig) -> None:
        tmp = self.path("config.json.tmp")
        tmp.write_text(json.dumps(config.to_json(), indent=2) + "\n")
        tmp.rename(self.path("config.json"))

    @property
    def pid(self) -> int | None:
        try:
            return int(self.path("qemu.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def state(self) -> str:
        """``running`` (QEMU process alive), ``dead`` (pid file but no process) or
        ``shut off``.  Finer run states (paused...) need QMP: see :func:`query_state`."""
        pid = self.pid
        if pid is None:
            return "shut off"
        return "running" if _pid_alive(pid) else "dead"

    @property
    def autostart(self) -> bool:
        return self.path("autostart").exists()

    def set_autostart(self, on: bool) -> None:
        if on:
            self.path("autostart").touch()
        else:
            self.path("autostart").unlink(missing_ok=True)

    def hotplugged(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.path("hotplug.json").read_text()))
        except (OSError, ValueError):
            return {}

    def save_hotplugged(self, data: dict[str, Any]) -> None:
        self.path("hotplug.json").write_text(json.dumps(data, indent=2) + "\n")

    def clear_runtime(self) -> None:
        for name in RUNTIME_FILES:
            self.path(name).unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self, timeout: float = 10.0) -> Iterator[None]:
        """Hold the VM's lock file (exclusive flock) for the block; raises VmStateError
        when another kvmkit holds it for longer than ``timeout`` seconds."""
        fd = os.open(self.path("lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise VmStateError(
                            f"VM {self.name} is busy: another kvmkit command holds its lock",
                            hint="wait for it to finish",
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    @contextlib.asynccontextmanager
    async def qmp(self, timeout: float = 5.0) -> AsyncIterator[QMPClient]:
        """A QMP connection to the running VM."""
        if self.state() != "running":
            raise VmStateError(f"VM {self.name} is {self.state()}", hint="start it first")
        async with open_qmp(self.path("qmp.sock"), connect_timeout=timeout) as qmp:
            yield qmp


class VmStore:
    """The folder of all VMs of this user."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or state_root()) / "vms"

    def _dir(self, name: str) -> Path:
        if not _NAME.match(name):
            raise VmStateError(
                f"bad VM name {name!r}",
                hint="use letters, digits, '.', '_' and '-', starting with a letter or digit",
            )
        return self.root / name

    def get(self, name: str) -> VmRecord:
        directory = self._dir(name)
        if not (directory / "config.json").exists():
            raise VmStateError(f"no VM named {name}", hint="see `kvmkit vm list`")
        return VmRecord(name, directory)

    def exists(self, name: str) -> bool:
        return (self._dir(name) / "config.json").exists()

    def create(self, name: str, config: MachineConfig) -> VmRecord:
        directory = self._dir(name)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        directory.mkdir(mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        record = VmRecord(name, directory)
        config.name = name
        record.save_config(config)
        return record

    def all(self) -> list[VmRecord]:
        if not self.root.is_dir():
            return []
        return [
            VmRecord(d.name, d) for d in sorted(self.root.iterdir()) if (d / "config.json").exists()
        ]

    def remove(self, name: str) -> None:
        record = self.get(name)
        if record.state() == "running":
            raise VmStateError(f"VM {name} is running", hint="destroy it first")
        import shutil

        shutil.rmtree(record.directory)

    def cleanup(self) -> list[str]:
        """Remove the runtime files of every VM whose QEMU died; returns their names."""
        cleaned = []
        for record in self.all():
            if record.state() == "dead":
                record.clear_runtime()
                cleaned.append(record.name)
        return cleaned


async def spawn(
    record: VmRecord,
    config: MachineConfig,
    *,
    incoming: str | None = None,
    subdir: str | None = None,
    timeout: float = 20.0,
) -> int:
    """Start QEMU for ``record`` detached from this process (own session), with its
    sockets in the VM folder (or ``subdir`` of it); returns the pid once QMP answers.
    Raises LaunchError with exit code, command line and log tail when it does not."""
    directory = record.directory / subdir if subdir else record.directory
    directory.mkdir(mode=0o700, exist_ok=True)
    for name in RUNTIME_FILES:
        (directory / name).unlink(missing_ok=True)
    accel = choose_accel(config.accel)
    cmd = build_command(
        config,
        accel=accel.name,
        qmp_socket=directory / "qmp.sock",
        console_socket=directory / "console.sock",
        console_log=record.directory / "console.log",
        pidfile=None,
        paused=incoming is not None,
        incoming=incoming,
    )
    log_path = directory / "qemu.log"
    with open(log_path, "ab") as log:
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        except OSError as exc:
            raise LaunchError(f"cannot start {config.qemu_binary}: {exc}", cmdline=cmd) from exc
    (directory / "qemu.pid").write_text(f"{proc.pid}\n")
    (directory / "accel").write_text(f"{accel}\n")

    def failure(message: str) -> LaunchError:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-10:])
        return LaunchError(message, exit_code=proc.poll(), cmdline=cmd, log_tail=tail)

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            (directory / "qemu.pid").unlink(missing_ok=True)
            raise failure(f"QEMU for VM {record.name} exited during start-up")
        if (directory / "qmp.sock").exists():
            try:
                async with open_qmp(directory / "qmp.sock", connect_timeout=2.0) as qmp:
                    await qmp.execute("query-status")
                break
            except Exception:
                await trio.sleep(0.2)
                if proc.poll() is not None:
                    continue
        if time.monotonic() > deadline:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            (directory / "qemu.pid").unlink(missing_ok=True)
            raise failure(f"QEMU for VM {record.name} did not answer QMP within {timeout:g} s")
        await trio.sleep(0.05)
    return proc.pid


async def wait_console_marker(record: VmRecord, marker: str, timeout: float) -> bool:
    """Wait until ``marker`` appears in the VM's console log; False on timeout or death."""
    deadline = time.monotonic() + timeout
    log = record.path("console.log")
    start = log.stat().st_size if log.exists() else 0
    while time.monotonic() < deadline:
        if record.state() != "running":
            return False
        try:
            with open(log, "rb") as f:
                f.seek(start)
                if marker.encode() in f.read():
                    return True
        except OSError:
            pass
        await trio.sleep(0.1)
    return False


async def stop_process(record: VmRecord, *, graceful: bool, powerdown_timeout: float = 30.0) -> str:
    """Stop the VM's QEMU: powerdown (if ``graceful``), quit, SIGTERM, SIGKILL, each with
    a timeout.  Returns the rung that ended it.  Removes the runtime files."""
    pid = record.pid
    if pid is None or not _pid_alive(pid):
        record.clear_runtime()
        return "not running"
    step = ""

    async def gone(timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                return True
            await trio.sleep(0.05)
        return not _pid_alive(pid)

    try:
        async with open_qmp(record.path("qmp.sock"), connect_timeout=3.0) as qmp:
            status = (await qmp.execute("query-status"))["status"]
            if graceful and status == "running":
                step = "system_powerdown"
                with trio.move_on_after(powerdown_timeout):
                    await qmp.execute_and_wait(
                        "system_powerdown", event="SHUTDOWN", timeout=powerdown_timeout
                    )
            if not await gone(5.0 if step else 0.0):
                step = "quit"
                with trio.move_on_after(5):
                    await qmp.execute("quit")
    except Exception:
        pass
    if not await gone(5.0):
        step = "SIGTERM"
        os.kill(pid, signal.SIGTERM)
        if not await gone(5.0):
            step = "SIGKILL"
            os.kill(pid, signal.SIGKILL)
            await gone(5.0)
    record.clear_runtime()
    return step
