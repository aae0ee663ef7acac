"""Test-wide fixtures and guards.

Tests use the real /dev/kvm and a real qemu-system-x86_64.  A test that needs one of them
skips with the reason only when the host truly lacks it; everything else must pass.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest


def _kvm_usable() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm on this host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


@pytest.fixture(scope="session")
def require_kvm() -> None:
    reason = _kvm_usable()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def qemu_binary() -> str:
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        pytest.skip("qemu-system-x86_64 is not installed (make test installs it)")
    return path


# -- nothing a test starts outlives the suite -------------------------------------------
#
# At session start the test process gets a session marker in its environment, inherited
# by every child, and an audit hook that records every temp file and directory tempfile
# creates in it.  At the end the session fails if anything the tests started is still
# there: a process (a child of pytest, or any process whose environment carries the
# marker, which catches daemonized QEMUs), an open socket of pytest's own, a recorded temp
# path, a network namespace or an LXC container that was not there before.  Leftover
# processes are then killed by PID and leftover temp paths removed, so a failed run does
# not litter.  (TMPDIR is left alone: QEMU's unix socket paths must stay under 108 bytes.)

SESSION_VAR = "KVMKIT_TEST_SESSION"
#: Every network namespace a test makes starts with this (the leak check looks at these).
NETNS_PREFIX = "kk-"


def _netns() -> set[str]:
    if shutil.which("ip") is None:
        return set()
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _containers() -> set[str]:
    if shutil.which("lxc-ls") is None:
        return set()
    out = subprocess.run(["lxc-ls", "-1"], capture_output=True, text=True, timeout=30)
    return {line.strip() for line in out.stdout.splitlines() if line.strip()}


def _own_sockets() -> set[tuple[int, str]]:
    import psutil

    return {(c.fd, c.type.name) for c in psutil.Process().net_connections(kind="all")}


def _our_processes(marker: str) -> dict[int, str]:
    """Every process started by this session: pytest's descendants, and any process whose
    environment carries the session marker (daemons leave pytest's tree, not its env)."""
    import psutil

    me = psutil.Process()
    found = {p.pid: p for p in me.children(recursive=True)}
    for p in psutil.process_iter():
        try:
            if p.pid != me.pid and p.environ().get(SESSION_VAR) == marker:
                found[p.pid] = p
        except (psutil.Error, OSError):
            continue
    described = {}
    for pid, p in found.items():
        try:
            described[pid] = " ".join(p.cmdline())[:200] or p.name()
        except psutil.Error:
            continue
    return described


class _LeakCheck:
    def __init__(self) -> None:
        self.marker = f"{os.getpid()}-{time.time_ns()}"
        os.environ[SESSION_VAR] = self.marker
        self.temp_paths: list[str] = []
        self.recording = True
        sys.addaudithook(self._audit)  # cannot be removed: ``recording`` turns it off
        self.netns = _netns()
        self.containers = _containers()
        self.sockets = _own_sockets()

    def _audit(self, event: str, args: tuple[object, ...]) -> None:
        if self.recording and event in ("tempfile.mkdtemp", "tempfile.mkstemp"):
            self.temp_paths.append(str(args[0]))

    def leftovers(self) -> list[str]:
        self.recording = False
        found = []
        for pid, cmd in sorted(_our_processes(self.marker).items()):
            found.append(f"process {pid}: {cmd}")
        for fd, kind in sorted(_own_sockets() - self.sockets):
            found.append(f"socket fd {fd} ({kind}) still open in the test process")
        found += [f"temp path {p}" for p in self.temp_paths if os.path.lexists(p)]
        # tests name their namespaces kk-*: another session's on this host are not ours
        new_netns = sorted(n for n in _netns() - self.netns if n.startswith(NETNS_PREFIX))
        found += [f"network namespace {n}" for n in new_netns]
        found += [f"LXC container {c}" for c in sorted(_containers() - self.containers)]
        return found

    def clean_up(self) -> None:
        import psutil

        for pid in _our_processes(self.marker):
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        for path in self.temp_paths:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.unlink(path)
        os.environ.pop(SESSION_VAR, None)


_leak_check: _LeakCheck | None = None


def pytest_sessionstart(session: pytest.Session) -> None:
    global _leak_check
    # A suite started from a background job inherits SIGINT ignored (and children would
    # inherit that through exec): give the test process Python's usual handler, so every
    # child starts with the default disposition however the suite was launched.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    _leak_check = _LeakCheck()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _leak_check is None:
        return
    try:
        found = _leak_check.leftovers()
    finally:
        _leak_check.clean_up()
    if found:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = ["tests left these behind (now removed):", *(f"  {f}" for f in found)]
        if reporter is not None:
            reporter.write_sep("=", "LEAK CHECK FAILED", red=True)
            for line in lines:
                reporter.write_line(line)
        else:
            print("\n".join(lines), file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
