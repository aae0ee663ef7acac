"""Test-wide fixtures and guards.

Tests use the real /dev/kvm and a real qemu-system-x86_64.  A test that needs one of them
skips with the reason only when the host truly lacks it; everything else must pass.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

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
# At session start every test process gets a private temp directory (TMPDIR and
# tempfile's own), inherited by every child.  At the end the session fails if anything
# the tests started is still there: a process (a child of pytest, or any process whose
# environment carries that TMPDIR, which catches daemonized QEMUs), an open socket of
# pytest's own, a file or directory in the private temp directory (sockets included), a
# network namespace or an LXC container that was not there before.  Leftover processes
# are then killed by PID and the directory removed, so a failed run does not litter.


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


def _our_processes(tmpdir: str) -> dict[int, str]:
    """Every process started by this session: pytest's descendants, and any process whose
    environment carries the session's TMPDIR (daemons leave pytest's tree, not its env)."""
    import psutil

    me = psutil.Process()
    found = {p.pid: p for p in me.children(recursive=True)}
    marker = f"TMPDIR={tmpdir}"
    for p in psutil.process_iter():
        try:
            if p.pid != me.pid and marker in "\0".join(f"{k}={v}" for k, v in p.environ().items()):
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
        self.saved_tmpdir = (os.environ.get("TMPDIR"), tempfile.tempdir)
        self.tmpdir = tempfile.mkdtemp(prefix="kvmkit-tests-")
        os.environ["TMPDIR"] = self.tmpdir
        tempfile.tempdir = self.tmpdir
        self.netns = _netns()
        self.containers = _containers()
        self.sockets = _own_sockets()

    def leftovers(self) -> list[str]:
        found = []
        for pid, cmd in sorted(_our_processes(self.tmpdir).items()):
            found.append(f"process {pid}: {cmd}")
        for fd, kind in sorted(_own_sockets() - self.sockets):
            found.append(f"socket fd {fd} ({kind}) still open in the test process")
        for path in sorted(Path(self.tmpdir).rglob("*")):
            pytests_own = path.parent == Path(self.tmpdir) and path.name.startswith("pytest-of-")
            if (path.parent == Path(self.tmpdir) and not pytests_own) or path.is_socket():
                found.append(f"temp {'socket' if path.is_socket() else 'path'}: {path}")
        found += [f"network namespace {n}" for n in sorted(_netns() - self.netns)]
        found += [f"LXC container {c}" for c in sorted(_containers() - self.containers)]
        return found

    def clean_up(self) -> None:
        import psutil

        for pid in _our_processes(self.tmpdir):
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        env, tempdir = self.saved_tmpdir
        if env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = env
        tempfile.tempdir = tempdir


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
