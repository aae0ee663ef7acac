"""QemuMachine: one QEMU process, launched and owned by the calling trio task.

::

    config = guest_kit_config(ensure_kit(), memory_mib=256)
    async with QemuMachine(config) as vm:
        await vm.wait_ready()
        print(await vm.console.run("uname -r"))
        print(await vm.qmp.execute("query-status"))

Launch: a private ``0700`` directory holds the QMP socket, the serial console socket,
the console log and QEMU's stderr.  QEMU starts paused (``-S``); kvmkit connects QMP and
the console, then sends ``cont`` (unless it is a migration destination), so no console
output is lost.  A launch failure raises :class:`LaunchError` with the exit code, the
command line and the tail of QEMU's output.

Shutdown is a ladder, run on every exit path (cancellation included, shielded):
``system_powerdown`` and wait for ``SHUTDOWN`` (only when the guest runs), then
``quit``, then SIGTERM, then SIGKILL, each with a timeout.  Afterwards no process,
socket or directory of the machine remains.

A machine that must outlive the calling program (``kvmkit vm``) is launched with
``detached=True`` into a ``directory`` the caller names, then :meth:`QemuMachine.detach`
lets it go.  Later, :meth:`QemuMachine.adopt` wraps that running QEMU again (given a
:class:`ProcessHandle` whose identity the caller has verified), so the same ladder
stops it.
"""

from __future__ import annotations

import enum
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import trio

if sys.version_info < (3, 11):  # trio depends on the backport there
    from exceptiongroup import BaseExceptionGroup

from kvmkit.childproc import default_signal_dispositions
from kvmkit.qemu.accel import AccelChoice, choose_accel
from kvmkit.qemu.config import MachineConfig, build_command, format_command
from kvmkit.qemu.console import SerialConsole
from kvmkit.qemu.errors import LaunchError, MachineStateError
from kvmkit.qemu.guestkit import PROMPT, READY_MARKER
from kvmkit.qmp import ConnectError, QMPClient, QMPError, open_qmp


class State(enum.Enum):
    """Where a :class:`QemuMachine` is in its life, from launch to shutdown or detach."""

    NEW = "new"
    LAUNCHING = "launching"
    RUNNING = "running"  # the QEMU process is up (the guest may be paused)
    SHUTTING_DOWN = "shutting-down"
    STOPPED = "stopped"
    DETACHED = "detached"  # QEMU runs on, no longer owned by this object


class ProcessHandle(Protocol):
    """What the shutdown ladder needs of a QEMU process (``trio.Process`` has it).

    An adopted process's handle must only ever signal the process it was verified to
    be (e.g. through a pidfd), never whatever process has that PID now."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...

    async def wait(self) -> int: ...


class QemuMachine(trio.abc.AsyncResource):
    """One QEMU guest.  Use as ``async with`` (or :meth:`launch` then :meth:`aclose` in
    the same task).

    ``incoming`` (e.g. ``"defer"``) makes it a migration destination: it is not resumed
    after launch.  ``qmp_transport`` is ``"unix"`` (a socket in the private directory,
    which other clients can use too) or ``"socketpair"`` (a connected pair; nothing on
    disk, and under cancellation the ladder can only signal).  ``base_dir`` is where the
    private directory is created (default: the system temp dir); ``directory`` instead
    names it exactly (it must not exist yet; it is created ``0700`` and removed at
    shutdown).  ``detached`` starts QEMU in its own session, so it survives this program
    once :meth:`detach` is called.  ``console_log`` names a file outside the directory
    that collects the guest's console output (appended; it outlives the machine).
    Timeouts are in seconds.
    """

    def __init__(
        self,
        config: MachineConfig,
        *,
        incoming: str | None = None,
        base_dir: str | Path | None = None,
        launch_timeout: float = 20.0,
        powerdown_timeout: float = 5.0,
        quit_timeout: float = 5.0,
        term_timeout: float = 5.0,
        qmp_transport: str = "unix",
        directory: str | Path | None = None,
        detached: bool = False,
        console_log: str | Path | None = None,
    ) -> None:
        if qmp_transport not in ("unix", "socketpair"):
            raise MachineStateError(
                f"unknown QMP transport {qmp_transport!r}", hint="use unix or socketpair"
            )
        self.qmp_transport = qmp_transport
        self.config = config
        self.incoming = incoming
        self.accel: AccelChoice = choose_accel(config.accel)
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.fixed_directory = Path(directory) if directory is not None else None
        self.detached = detached
        self._console_log = Path(console_log) if console_log is not None else None
        self._adopted = False
        self._nursery: trio.Nursery | None = None
        self.launch_timeout = launch_timeout
        self.powerdown_timeout = powerdown_timeout
        self.quit_timeout = quit_timeout
        self.term_timeout = term_timeout
        self.state = State.NEW
        self.directory: Path | None = None
        self.cmdline: list[str] = []
        self.exit_code: int | None = None
        self.shutdown_step: str | None = None  # which rung of the ladder ended QEMU
        self.started_at: float | None = None
        self._process: ProcessHandle | None = None
        self._qmp: QMPClient | None = None
        self._console: SerialConsole | None = None
        self._stack: AsyncExitStack | None = None
        self._exited = trio.Event()
        self._served = False  # launched into a nursery: _serve owns the teardown
        self._close_requested = trio.Event()
        self._close_graceful = True
        self._closed = trio.Event()

    # -- paths and accessors -------------------------------------------------------------

    def _path(self, name: str) -> Path:
        if self.directory is None:
            raise MachineStateError("the machine has not been launched")
        return self.directory / name

    @property
    def qmp_socket(self) -> Path:
        return self._path("qmp.sock")

    @property
    def console_socket(self) -> Path:
        return self._path("console.sock")

    @property
    def console_log(self) -> Path:
        if self._console_log is not None:
            return self._console_log
        return self._path("console.log")

    @property
    def log_path(self) -> Path:
        return self._path("qemu.log")

    @property
    def qmp(self) -> QMPClient:
        if self._qmp is None or self.state is not State.RUNNING:
            raise MachineStateError(f"machine {self.config.name} is {self.state.value}; no QMP")
        return self._qmp

    @property
    def console(self) -> SerialConsole:
        if self._console is None:
            raise MachineStateError(f"machine {self.config.name} has no console yet")
        return self._console

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """True while the QEMU process exists."""
        return self._process is not None and self._process.returncode is None

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines QEMU wrote to stdout/stderr."""
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, MachineStateError):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- launch --------------------------------------------------------------------------

    async def __aenter__(self) -> QemuMachine:
        await self.launch()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _launch_error(self, message: str, hint: str | None = None) -> LaunchError:
        code = self._process.returncode if self._process is not None else None
        return LaunchError(
            message, exit_code=code, cmdline=self.cmdline, log_tail=self.log_tail(), hint=hint
        )

    async def launch(self, nursery: trio.Nursery | None = None) -> None:
        """Start QEMU, connect QMP and the console, and resume the guest (unless it is a
        migration destination).  On failure everything started is torn down again.

        Without ``nursery``, the machine's tasks live in the calling task: :meth:`aclose`
        must then be called from the same task, and machines launched this way must be
        closed in reverse order of launch (as nested ``async with`` blocks do).  With
        ``nursery``, they live in a task of that nursery, and machines can be closed in
        any order (e.g. a migration source closed after its destination took over).
        """
        if self.state is not State.NEW:
            raise MachineStateError(f"machine {self.config.name} was already launched")
        if nursery is not None:
            await nursery.start(self._serve)
            return
        self.state = State.LAUNCHING
        try:
            await self._launch()
        except BaseException:
            await self.aclose()
            raise
        self.state = State.RUNNING

    async def _serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._served = True
        self.state = State.LAUNCHING
        try:
            await self._launch()
            self.state = State.RUNNING
            task_status.started()
            await self._close_requested.wait()
        finally:
            await self._teardown(self._close_graceful, from_server=True)
            self._closed.set()

    def _make_directory(self) -> Path:
        if self.fixed_directory is not None:
            self.fixed_directory.mkdir(mode=0o700)  # must be new: nobody else's sockets
            return self.fixed_directory
        kwargs: dict[str, Any] = {"prefix": f"kvmkit-{self.config.name}-"}
        if self.base_dir is not None:
            self.base_dir.mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = self.base_dir
        return Path(tempfile.mkdtemp(**kwargs))  # mkdtemp creates it 0700

    async def _launch(self) -> None:
        self.directory = self._make_directory()
        os.chmod(self.directory, 0o700)
        self.started_at = time.time()
        ours: socket.socket | None = None
        theirs: socket.socket | None = None
        if self.qmp_transport == "socketpair":
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.cmdline = build_command(
                self.config,
                accel=self.accel.name,
                qmp_socket=self.qmp_socket,
                qmp_fd=theirs.fileno() if theirs is not None else None,
                console_socket=self.console_socket,
                console_log=self.console_log,
                paused=True,
                incoming=self.incoming,
            )
            # QEMU's stdout/stderr need a real fd; opening a local log file does not block.
            with open(self.log_path, "wb") as log:  # noqa: ASYNC230
                try:
                    self._process = await trio.lowlevel.open_process(
                        self.cmdline,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                        pass_fds=(theirs.fileno(),) if theirs is not None else (),
                        preexec_fn=default_signal_dispositions,
                        start_new_session=self.detached,
                    )
                except OSError as exc:
                    raise LaunchError(
                        f"cannot start {self.config.qemu_binary}: {exc}",
                        cmdline=self.cmdline,
                        hint="install qemu-system-x86 or set qemu_binary",
                    ) from exc
        except BaseException:
            if ours is not None:
                ours.close()
            raise
        finally:
            if theirs is not None:
                theirs.close()  # QEMU has its own copy now
        self._stack = AsyncExitStack()
        nursery = await self._stack.enter_async_context(trio.open_nursery())
        self._nursery = nursery
        nursery.start_soon(self._watch_process)

        deadline = trio.current_time() + self.launch_timeout
        # QEMU creates its sockets while it initialises, before it checks devices.
        first = self.qmp_socket if ours is None else self.console_socket
        while not first.exists():
            if self._process.returncode is not None or self._exited.is_set():
                if ours is not None:
                    ours.close()
                await self._process.wait()
                raise self._launch_error(f"QEMU exited during start-up of {self.config.name}")
            if trio.current_time() > deadline:
                if ours is not None:
                    ours.close()
                raise self._launch_error(
                    f"QEMU did not create its sockets within {self.launch_timeout:g} s"
                )
            await trio.sleep(0.01)
        address: Any = ours
        if ours is None:
            # The socket file exists from bind(); connections are refused until listen().
            probe = await self._connect_unix(self.qmp_socket, deadline)
            await probe.aclose()
            address = self.qmp_socket
        try:
            self._qmp = await self._stack.enter_async_context(
                open_qmp(address, connect_timeout=max(1.0, deadline - trio.current_time()))
            )
        except ConnectError as exc:
            # QEMU creates the socket before it checks devices: it may be exiting now.
            with trio.move_on_after(3):
                await self._exited.wait()
            if self._exited.is_set():
                raise self._launch_error(
                    f"QEMU exited during start-up of {self.config.name}"
                ) from exc
            raise self._launch_error(f"cannot connect to QEMU's QMP socket: {exc}") from exc
        stream = await self._connect_unix(self.console_socket, deadline)
        self._console = SerialConsole(stream, name=f"{self.config.name} console")
        await self._console.start(nursery)
        if self.incoming is None:
            await self._qmp.execute("cont")

    async def _connect_unix(self, path: Path, deadline: float) -> trio.SocketStream:
        while True:
            try:
                return await trio.open_unix_socket(str(path))
            except (ConnectionRefusedError, FileNotFoundError) as exc:
                if self._exited.is_set():
                    await trio.sleep(0.05)
                    raise self._launch_error(
                        f"QEMU exited during start-up of {self.config.name}"
                    ) from exc
                if trio.current_time() > deadline:
                    raise self._launch_error(f"QEMU does not accept connections on {path}") from exc
                await trio.sleep(0.01)

    async def _watch_process(self) -> None:
        assert self._process is not None
        await self._process.wait()
        self.exit_code = self._process.returncode
        self._exited.set()

    # -- detach and adopt ------------------------------------------------------------------

    async def detach(self) -> None:
        """Let a ``detached`` machine go: close QMP and the console, keep QEMU and the
        directory.  Must be called from the task that launched it (not with a nursery)."""
        if not self.detached or self._served or self.state is not State.RUNNING:
            raise MachineStateError(
                f"machine {self.config.name} is {self.state.value}; only a running machine"
                " launched with detached=True (no nursery) can be detached"
            )
        if self._console is not None:
            await self._console.aclose()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await _close_quietly(stack)
        self._qmp = None
        self._console = None
        self.state = State.DETACHED

    @classmethod
    def adopt(
        cls, config: MachineConfig, directory: Path, process: ProcessHandle, **kwargs: Any
    ) -> QemuMachine:
        """A machine for a QEMU that runs already (launched ``detached`` earlier), so
        :meth:`shutdown`/:meth:`kill` can stop it with the ladder; QMP is reached through
        ``directory/qmp.sock``.  ``process`` must be verified to be that QEMU."""
        machine = cls(config, directory=directory, **kwargs)
        machine.directory = Path(directory)
        machine._process = process
        machine._adopted = True
        machine.state = State.RUNNING
        return machine

    # -- guest ---------------------------------------------------------------------------

    async def wait_ready(self, timeout: float = 90.0) -> None:
        """Wait until the guest kit's init prints its ready marker and the shell prompt.
        Raises ConsoleTimeout (with the console tail) when it does not, and LaunchError
        when QEMU dies meanwhile."""
        try:
            await self.console.expect(READY_MARKER, timeout)
            await self.console.expect(PROMPT, timeout)
        except Exception:
            if not self.running:
                await trio.sleep(0.05)
                raise self._launch_error("QEMU exited before the guest was ready") from None
            raise

    async def status(self) -> str:
        """QEMU's run state (``running``, ``paused``, ``inmigrate``, ...)."""
        reply = await self.qmp.execute("query-status")
        return str(reply["status"])

    async def pause(self) -> None:
        if await self.status() != "paused":
            await self.qmp.execute_and_wait("stop", event="STOP", timeout=10)

    async def resume(self) -> None:
        if await self.status() != "running":
            await self.qmp.execute_and_wait("cont", event="RESUME", timeout=10)

    async def wait_exit(self, timeout: float) -> int:
        """Wait for the QEMU process to end by itself; returns its exit code."""
        with trio.fail_after(timeout):
            await self._exited.wait()
        assert self.exit_code is not None
        return self.exit_code

    # -- shutdown ------------------------------------------------------------------------

    async def shutdown(self, *, graceful: bool = True) -> None:
        """Run the shutdown ladder now (``graceful=False`` skips ``system_powerdown``)."""
        await self._teardown(graceful)

    async def kill(self) -> None:
        """SIGKILL QEMU at once and clean up (no powerdown, no quit)."""
        if self.running and self._process is not None:
            self._process.send_signal(signal.SIGKILL)
        await self._teardown(False)

    async def aclose(self) -> None:
        await self._teardown(True)

    async def _wait_gone(self, timeout: float) -> bool:
        assert self._process is not None
        with trio.move_on_after(timeout):
            await self._process.wait()
        return self._process.returncode is not None

    async def _teardown(self, graceful: bool, *, from_server: bool = False) -> None:
        if self._served and not from_server:
            # The serving task entered the machine's contexts: it must exit them.
            self._close_graceful = graceful
            self._close_requested.set()
            with trio.CancelScope(shield=True):
                await self._closed.wait()
            return
        if self.state in (State.STOPPED, State.DETACHED):
            return  # a detached QEMU is not ours to stop; adopt it for that
        self.state = State.SHUTTING_DOWN
        # Under cancellation the QMP client's own tasks are cancelled too, so the ladder
        # talks to QEMU over a fresh connection opened inside the shield.
        cancelled = trio.current_effective_deadline() == -math.inf
        try:
            with trio.CancelScope(shield=True):
                if self._process is not None and self._process.returncode is None:
                    if cancelled and self._qmp is not None:
                        await self._qmp.aclose()
                        await self._ladder_fresh(graceful)
                    elif self._adopted:
                        await self._ladder_fresh(graceful)
                    else:
                        await self._ladder(graceful, self._qmp)
                if self._process is not None and self._process.returncode is None:
                    await self._process.wait()  # after SIGKILL: cannot block for long
                if self._console is not None:
                    await self._console.aclose()
            # The stack holds a nursery and QMP's cancel scopes: it must be exited outside
            # the shield above, at the nesting level where launch() entered it.
            if self._stack is not None:
                stack, self._stack = self._stack, None
                await _close_quietly(stack)
        finally:
            self._qmp = None
            if self._process is not None:
                self.exit_code = self._process.returncode
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)
            self.state = State.STOPPED

    async def _ladder_fresh(self, graceful: bool) -> None:
        if self.qmp_transport == "socketpair":
            await self._ladder(False, None)  # the only QMP channel is gone: signals
            return
        try:
            async with open_qmp(self.qmp_socket, connect_timeout=2.0) as fresh:
                await self._ladder(graceful, fresh)
        except (QMPError, OSError):
            pass
        if self._process is not None and self._process.returncode is None:
            await self._ladder(False, None)

    async def _ladder(self, graceful: bool, qmp: QMPClient | None) -> None:
        """Shut down by the ladder powerdown → quit → SIGTERM → SIGKILL; each rung only if
        QEMU is still there."""
        assert self._process is not None
        if qmp is not None and qmp.closed:
            qmp = None  # nobody to talk to: straight to the signals
        if qmp is not None and graceful and await self._guest_running(qmp):
            self.shutdown_step = "system_powerdown"
            try:
                await qmp.execute_and_wait(
                    "system_powerdown", event="SHUTDOWN", timeout=self.powerdown_timeout
                )
            except QMPError:
                pass  # no ACPI handler in the guest, or QEMU went away: next rung
            else:
                if await self._wait_gone(self.powerdown_timeout):
                    return
        if qmp is not None and self._process.returncode is None:
            self.shutdown_step = "quit"
            try:
                with trio.move_on_after(self.quit_timeout):
                    await qmp.execute("quit", timeout=self.quit_timeout)
            except QMPError:
                pass  # QEMU may close the socket before it replies
            if await self._wait_gone(self.quit_timeout):
                return
        if self._process.returncode is None:
            self.shutdown_step = "SIGTERM"
            self._process.send_signal(signal.SIGTERM)
            if await self._wait_gone(self.term_timeout):
                return
        if self._process.returncode is None:
            self.shutdown_step = "SIGKILL"
            self._process.send_signal(signal.SIGKILL)

    @staticmethod
    async def _guest_running(qmp: QMPClient) -> bool:
        try:
            with trio.move_on_after(1.0):
                reply = await qmp.execute("query-status", timeout=1.0)
                return bool(reply.get("status") == "running")
        except QMPError:
            pass
        return False

    def describe(self) -> dict[str, Any]:
        """A summary for display: name, pid, accelerator and why, command line."""
        return {
            "name": self.config.name,
            "pid": self.pid,
            "state": self.state.value,
            "accel": self.accel.name,
            "accel_reason": self.accel.reason,
            "directory": str(self.directory) if self.directory else None,
            "cmdline": format_command(self.cmdline) if self.cmdline else None,
            "started_at": self.started_at,
        }


async def _close_quietly(stack: AsyncExitStack) -> None:
    """Exit ``stack``; a QMP connection that QEMU already dropped is no error here."""
    try:
        await stack.aclose()
    except (QMPError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except BaseExceptionGroup as group:
        rest = group.subgroup(
            lambda e: (
                not isinstance(e, QMPError | trio.BrokenResourceError | trio.ClosedResourceError)
            )
        )
        if rest is not None:
            raise rest from None
