"""A recorded QEMU process, signalled only when it is provably the one kvmkit started.

A PID alone is no identity: once QEMU has exited, the kernel hands the number to the
next process.  So the state store records the PID with the process's start time and
command line (read through :mod:`psutil` right after launch), and :func:`find` opens a
pidfd *first* and checks start time and command line *after*: when they match, the pidfd
refers to exactly that process, and every signal goes through it
(``pidfd_send_signal``), so it cannot reach a process that took the PID later.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from dataclasses import dataclass

import psutil
import trio

#: Start times read twice from /proc agree to the clock tick; allow for rounding.
_START_TIME_SLACK = 0.05


@dataclass(frozen=True)
class Identity:
    """What makes a process the one kvmkit started: PID, start time, command line."""

    pid: int
    create_time: float
    cmdline: tuple[str, ...]

    @classmethod
    def of(cls, pid: int) -> Identity:
        """The identity of the live process ``pid`` (psutil errors pass through)."""
        proc = psutil.Process(pid)
        return cls(pid, proc.create_time(), tuple(proc.cmdline()))


class TrustedProcess:
    """A verified QEMU process held by a pidfd (see :func:`find`); the shutdown ladder's
    :class:`kvmkit.qemu.machine.ProcessHandle`.  Close it with :meth:`close`."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self._fd = pidfd
        self._returncode: int | None = None

    @property
    def returncode(self) -> int | None:
        """None while the process runs; its exit status once it has exited (``-1`` when
        it is not this program's child and the status is unknown)."""
        if self._returncode is None and self._fd >= 0:
            readable, _, _ = select.select([self._fd], [], [], 0)
            if readable:
                self._returncode = self._reap()
        return self._returncode

    def _reap(self) -> int:
        try:  # our own child (started in this program): collect it, no zombie left
            result = os.waitid(os.P_PIDFD, self._fd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            return -1
        return result.si_status if result is not None else -1

    def send_signal(self, sig: int) -> None:
        """Signal the verified process (a no-op once it has exited)."""
        if self.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._fd, sig)

    async def wait(self) -> int:
        """Wait until the process exits; returns :attr:`returncode`."""
        while self.returncode is None:
            await trio.lowlevel.wait_readable(self._fd)
        return self._returncode if self._returncode is not None else -1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def find(identity: Identity) -> TrustedProcess | None:
    """The process ``identity`` names if it still runs, else None.  None also when the
    PID now belongs to another process (start time or command line differ), or the
    process has exited and waits to be reaped."""
    try:
        fd = os.pidfd_open(identity.pid)
    except ProcessLookupError:
        return None
    try:
        proc = psutil.Process(identity.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            raise psutil.ZombieProcess(identity.pid)
        same = (
            abs(proc.create_time() - identity.create_time) <= _START_TIME_SLACK
            and tuple(proc.cmdline()) == identity.cmdline
        )
    except (psutil.NoSuchProcess, psutil.AccessDenied):  # ZombieProcess is a NoSuchProcess
        same = False
    if not same:
        os.close(fd)
        return None
    return TrustedProcess(identity.pid, fd)
