"""LXC containers, one :class:`Container` per name, its methods the ``lxc-*`` verbs one to
one: ``create`` (lxc-create), ``start`` (lxc-start), ``attach`` (lxc-attach), ``console``
(lxc-console), ``info`` (lxc-info), :func:`list_containers` (lxc-ls), ``stop`` (lxc-stop),
``destroy`` (lxc-destroy).

Built on the ``lxc-*`` tools, not on LXC's Python binding.  Both were tried here (LXC 5.0.2,
Debian 12, kvmkit's venv on pyenv's Python 3.11): Debian's ``python3-lxc`` is built for the
system Python and is not importable from a venv; the PyPI ``lxc`` package (3.0.4.0, 2022)
builds against ``lxc-dev`` and works, but

- its verbs return a bare ``False`` on failure ("name taken", "template missing", "no such
  container" all look the same), while each tool prints LXC's own reason on stderr and
  exits non-zero, which kvmkit keeps in :class:`~kvmkit.containers.errors.LxcCommandError`;
- ``Container.start()`` and ``attach_wait()`` fork the calling Python process (a trio
  program, with threads) to become the container's monitor or the attached process; the
  tools are small C programs of their own;
- it would add ``lxc-dev``, a C compiler step and an unmaintained PyPI package to every
  install, where the tools come with Debian's ``lxc`` package that the templates need
  anyway.

The cost is one process per verb (``lxc-start`` returns in about 25 ms here).

What the caller must know:

- LXC needs root here (privileged containers); every verb checks and says so.
- Containers live in a kvmkit-specific lxcpath (:func:`default_lxcpath`, or ``lxcpath=``),
  never in the host's ``/var/lib/lxc``.  LXC names cgroups ``lxc.payload.NAME`` without
  the lxcpath, so names must also be unique on the host while running.
- Networking is none by default (``lxc.net.0.type = empty``: only ``lo``).  With
  ``network="veth"`` LXC makes a veth pair in router mode: the container gets a /32 address
  from 10.254.0.0/16 and a route on the host through the host end (named ``kkv`` + a hash),
  with no bridge needed.  The pair dies with the container's network namespace when it
  stops; ``stop`` and ``destroy`` check and delete a host end left behind.
- The busybox template's ``/etc/init.d/rcS`` runs ``udhcpc``; there is no DHCP server
  (and with veth it would flush the static address), so ``create`` comments that line out.
- The container's console is logged to ``<lxcpath>/<name>/console.log``
  (:meth:`Container.console_log`), so the first line its init prints can be timed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvmkit.containers.errors import (
    ContainerExistsError,
    ContainerOutputError,
    ContainerStateError,
    InvalidNameError,
    LxcCommandError,
    LxcUnavailableError,
    NoSuchContainerError,
    TemplateNotFoundError,
)

__all__ = [
    "Container",
    "ContainerInfo",
    "list_containers",
    "default_lxcpath",
    "check_lxc",
    "NETWORKS",
    "VETH_PREFIX",
]

NETWORKS = ("none", "veth")
VETH_PREFIX = "kkv"
VETH_SUBNET = ipaddress.IPv4Network("10.254.0.0/16")
VETH_GATEWAY = "169.254.0.1"  # proxy-ARPed by the host end in router mode
TEMPLATE_DIRS = (Path("/usr/share/lxc/templates"), Path("/usr/local/share/lxc/templates"))
TOOLS = (
    "lxc-create",
    "lxc-start",
    "lxc-attach",
    "lxc-console",
    "lxc-info",
    "lxc-ls",
    "lxc-stop",
    "lxc-destroy",
)
MAX_OUTPUT = 16 * 2**20
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_STDERR_LIMIT = 64 * 1024


def default_lxcpath() -> Path:
    """``<kvmkit state dir>/containers`` (``$KVMKIT_STATE_DIR``, else the XDG state home)."""
    from kvmkit.statedir import state_root

    return state_root() / "containers"


def check_lxc() -> None:
    """Raise :class:`LxcUnavailableError` unless the ``lxc-*`` tools are here and we are root."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise LxcUnavailableError(
            f"LXC is not installed ({', '.join(missing)} not found)",
            hint="install it: apt-get install lxc (or run make sysdeps as root)",
        )
    if os.geteuid() != 0:
        raise LxcUnavailableError(
            "LXC containers need root here (kvmkit makes privileged containers)",
            hint="run it as root, e.g. sudo kvmkit ct ...",
        )


def _run(argv: Sequence[str], *, timeout: float, hint: str | None = None) -> str:
    """Run one lxc tool; its stdout, or :class:`LxcCommandError` with its stderr."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        raise LxcCommandError(argv, None, err[-_STDERR_LIMIT:], hint=hint) from None
    if done.returncode != 0:
        raise LxcCommandError(argv, done.returncode, done.stderr[-_STDERR_LIMIT:], hint=hint)
    return done.stdout


def _run_bounded(argv: Sequence[str], *, timeout: float | None, limit: int) -> tuple[int, bytes]:
    """Run ``argv`` with stdout and stderr merged; (exit status, output).  Reads at most
    ``limit`` bytes: past that, or past ``timeout``, the process (ours) is killed."""
    proc = subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    deadline = None if timeout is None else time.monotonic() + timeout
    chunks: list[bytes] = []
    size = 0
    fd = proc.stdout.fileno()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        try:
            while True:
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    raise LxcCommandError(
                        argv,
                        None,
                        b"".join(chunks)[-2048:].decode(errors="replace"),
                        hint=f"the command did not finish within {timeout:g} s",
                    )
                if not sel.select(wait):
                    continue
                data = os.read(fd, 65536)
                if not data:
                    break
                size += len(data)
                if size > limit:
                    raise ContainerOutputError(
                        f"the command printed more than {limit:,} bytes; stopped reading",
                        hint="raise max_output, or redirect the output inside the container",
                    )
                chunks.append(data)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            status = proc.wait(remaining)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            proc.stdout.close()
    return status, b"".join(chunks)


@dataclass
class ContainerInfo:
    """What ``lxc-info`` says, plus kvmkit's view of the network.  ``memory_bytes`` is the
    container cgroup's memory use (``memory.usage_in_bytes`` on cgroup v1,
    ``memory.current`` on v2), ``None`` when stopped."""

    name: str
    state: str
    lxcpath: str
    pid: int | None = None
    memory_bytes: int | None = None
    cpu_ns: int | None = None
    ips: list[str] = field(default_factory=list)
    network: str = "none"
    veth: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Container:
    """One LXC container ``name`` in ``lxcpath``.  Creating the object does nothing; the
    verbs check LXC and root, and raise errors of :mod:`kvmkit.containers.errors`."""

    def __init__(self, name: str, lxcpath: str | os.PathLike[str] | None = None) -> None:
        if not _NAME.match(name):
            raise InvalidNameError(
                f"invalid container name {name!r}",
                hint="use 1-64 letters, digits, '_', '.', '-', starting with a letter or digit",
            )
        self.name = name
        self.lxcpath = Path(lxcpath) if lxcpath is not None else default_lxcpath()

    def __repr__(self) -> str:
        return f"Container({self.name!r}, {str(self.lxcpath)!r})"

    # -- paths and helpers --------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self.lxcpath / self.name

    @property
    def defined(self) -> bool:
        """True once ``create`` has made its configuration."""
        return (self.directory / "config").is_file()

    @property
    def veth_name(self) -> str:
        """The host end of the veth pair, if ``network="veth"`` (15 characters at most)."""
        digest = hashlib.sha1(f"{self.lxcpath.resolve()}/{self.name}".encode()).hexdigest()
        return VETH_PREFIX + digest[:10]

    def _argv(self, tool: str, *args: str) -> list[str]:
        return [tool, "-P", str(self.lxcpath), "-n", self.name, *args]

    def _require_defined(self) -> None:
        check_lxc()
        if not self.defined:
            raise NoSuchContainerError(
                f"no container {self.name!r} in {self.lxcpath}",
                hint=f"create it first: kvmkit ct create {self.name}",
            )

    def _config_items(self) -> dict[str, str]:
        items: dict[str, str] = {}
        for line in (self.directory / "config").read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not key.lstrip().startswith("#"):
                items[key.strip()] = value.strip()
        return items

    @property
    def network(self) -> str:
        return "veth" if self._config_items().get("lxc.net.0.type") == "veth" else "none"

    @property
    def state(self) -> str:
        """``RUNNING``, ``STOPPED``, ... as ``lxc-info -s`` says."""
        self._require_defined()
        out = _run(self._argv("lxc-info", "-s", "-H"), timeout=10)
        return out.strip() or "UNKNOWN"

    @property
    def running(self) -> bool:
        return self.state == "RUNNING"

    # -- verbs --------------------------------------------------------------------------

    def create(self, template: str = "busybox", *, network: str = "none") -> None:
        """``lxc-create -t TEMPLATE`` with kvmkit's network configuration."""
        check_lxc()
        if network not in NETWORKS:
            raise ContainerStateError(
                f"unknown network {network!r}", hint=f"use one of {', '.join(NETWORKS)}"
            )
        if self.defined:
            raise ContainerExistsError(
                f"container {self.name!r} already exists in {self.lxcpath}",
                hint=f"pick another name, or remove it: kvmkit ct destroy {self.name}",
            )
        _check_template(template)
        lines = [f"lxc.console.logfile = {self.directory / 'console.log'}"]
        if network == "none":
            lines.append("lxc.net.0.type = empty")
        else:
            address = _free_address(self.lxcpath, self.name)
            lines += [
                "lxc.net.0.type = veth",
                "lxc.net.0.veth.mode = router",
                f"lxc.net.0.veth.pair = {self.veth_name}",
                "lxc.net.0.flags = up",
                f"lxc.net.0.ipv4.address = {address}/32",
                f"lxc.net.0.ipv4.gateway = {VETH_GATEWAY}",
            ]
        self.lxcpath.mkdir(parents=True, exist_ok=True)
        existed = self.directory.exists()
        with tempfile.NamedTemporaryFile("w", suffix=".conf", prefix="kvmkit-lxc-") as conf:
            conf.write("\n".join(lines) + "\n")
            conf.flush()
            try:
                _run(self._argv("lxc-create", "-t", template, "-f", conf.name), timeout=300)
            except LxcCommandError as exc:
                if not existed:  # lxc-create leaves a partial folder behind on failure
                    shutil.rmtree(self.directory, ignore_errors=True)
                if "not found" in exc.stderr and "emplate" in exc.stderr:
                    raise TemplateNotFoundError(
                        f"LXC has no template {template!r}", hint="try --template busybox"
                    ) from exc
                raise
        rcs = self.directory / "rootfs" / "etc" / "init.d" / "rcS"
        if rcs.is_file():
            text = rcs.read_text()
            rcs.write_text(re.sub(r"(?m)^(\s*/bin/udhcpc.*)$", r"# kvmkit: no DHCP here: \1", text))

    def start(self, *, timeout: float = 30.0) -> None:
        """``lxc-start`` (daemonized); returns once LXC reports the container running.
        The console log starts empty: it holds this run's output only."""
        self._require_defined()
        if self.running:
            raise ContainerStateError(f"container {self.name!r} is already running")
        log = self.directory / "lxc.log"
        log.unlink(missing_ok=True)
        (self.directory / "console.log").unlink(missing_ok=True)
        argv = self._argv("lxc-start", "-l", "ERROR", "-o", str(log))
        try:
            _run(argv, timeout=timeout)
        except LxcCommandError as exc:
            detail = log.read_text(errors="replace")[-_STDERR_LIMIT:] if log.exists() else ""
            raise LxcCommandError(
                argv,
                exc.status,
                exc.stderr + detail,
                hint=f"LXC's log is in {log}; run lxc-checkconfig to see what the kernel lacks",
            ) from exc

    def attach(
        self,
        cmd: Sequence[str],
        *,
        timeout: float | None = None,
        max_output: int = MAX_OUTPUT,
    ) -> tuple[int, str]:
        """``lxc-attach -- CMD`` with a clean environment; (exit status, stdout and stderr
        merged).  Output is limited to ``max_output`` bytes; after ``timeout`` seconds the
        ``lxc-attach`` process is killed (a command it left in the container ends when the
        container stops)."""
        if not cmd:
            raise ContainerStateError("attach needs a command", hint="e.g. attach(['uname', '-r'])")
        self._require_defined()
        if not self.running:
            raise ContainerStateError(
                f"container {self.name!r} is not running",
                hint=f"start it first: kvmkit ct start {self.name}",
            )
        argv = self._argv(
            "lxc-attach", "--clear-env", "-v", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "--"
        )
        status, output = _run_bounded([*argv, *cmd], timeout=timeout, limit=max_output)
        return status, output.decode(errors="replace")

    def console(self, *, tty: int = 1, escape: str = "a") -> int:
        """``lxc-console``: the container's tty ``tty`` on this terminal (Ctrl-<escape> q
        leaves).  Needs a terminal on stdin; returns lxc-console's exit status."""
        self._require_defined()
        if not self.running:
            raise ContainerStateError(
                f"container {self.name!r} is not running",
                hint=f"start it first: kvmkit ct start {self.name}",
            )
        if not sys.stdin.isatty():
            raise ContainerStateError(
                "the console needs a terminal",
                hint=f"run commands with: kvmkit ct attach {self.name} -- CMD",
            )
        return subprocess.call(self._argv("lxc-console", "-t", str(tty), "-e", f"^{escape}"))

    def console_log(self, limit: int = 64 * 1024) -> str:
        """The last ``limit`` bytes the container wrote on its console (cheap: reads the
        log file, runs no LXC tool)."""
        if not self.defined:
            raise NoSuchContainerError(f"no container {self.name!r} in {self.lxcpath}")
        path = self.directory / "console.log"
        try:
            with path.open("rb") as f:
                f.seek(max(0, path.stat().st_size - limit))
                return f.read(limit).decode(errors="replace")
        except FileNotFoundError:
            return ""

    def info(self) -> ContainerInfo:
        """``lxc-info``: state, init PID, the cgroup's memory use, CPU time, IPs."""
        self._require_defined()
        out = _run(self._argv("lxc-info", "-H"), timeout=10)
        network = self.network
        info = ContainerInfo(
            name=self.name,
            state="UNKNOWN",
            lxcpath=str(self.lxcpath),
            network=network,
            veth=self.veth_name if network == "veth" else None,
        )
        for line in out.splitlines():
            key, _, value = line.partition(":")
            value = value.strip()
            if key == "State":
                info.state = value
            elif key == "PID" and value.isdigit():
                info.pid = int(value)
            elif key == "Memory use" and value.isdigit():
                info.memory_bytes = int(value)
            elif key == "CPU use" and value.isdigit():
                info.cpu_ns = int(value)
            elif key == "IP":
                info.ips.append(value)
        return info

    def stop(self, *, timeout: float = 10.0, kill: bool = False) -> None:
        """``lxc-stop``: the halt signal to init, then SIGKILL after ``timeout`` seconds
        (at once with ``kill``).  Then no veth host end of this container is left."""
        self._require_defined()
        if not self.running:
            raise ContainerStateError(f"container {self.name!r} is not running")
        args = ["-k"] if kill else ["-t", str(max(1, round(timeout)))]
        _run(self._argv("lxc-stop", *args), timeout=timeout + 30)
        _delete_link(self.veth_name)

    def destroy(self, *, force: bool = False) -> None:
        """``lxc-destroy``: delete the container and its root file system.  A running one is
        refused unless ``force`` (then it is killed first)."""
        self._require_defined()
        if self.running:
            if not force:
                raise ContainerStateError(
                    f"container {self.name!r} is running",
                    hint=f"stop it first (kvmkit ct stop {self.name}) or use --force",
                )
            self.stop(kill=True)
        _run(self._argv("lxc-destroy"), timeout=120)
        _delete_link(self.veth_name)


def list_containers(lxcpath: str | os.PathLike[str] | None = None) -> list[ContainerInfo]:
    """``lxc-ls``: every container defined in ``lxcpath``, with its :meth:`Container.info`."""
    check_lxc()
    path = Path(lxcpath) if lxcpath is not None else default_lxcpath()
    if not path.is_dir():
        return []
    names = _run(["lxc-ls", "-P", str(path), "-1"], timeout=10).split()
    return [Container(name, path).info() for name in sorted(names)]


def _check_template(template: str) -> None:
    if "/" in template:
        if not os.access(template, os.X_OK):
            raise TemplateNotFoundError(
                f"template {template} is not an executable file", hint="try --template busybox"
            )
        return
    dirs = [d for d in TEMPLATE_DIRS if d.is_dir()]
    if dirs and not any((d / f"lxc-{template}").exists() for d in dirs):
        known = sorted(p.name[4:] for d in dirs for p in d.glob("lxc-*"))
        raise TemplateNotFoundError(
            f"LXC has no template {template!r}",
            hint=f"templates here: {', '.join(known) or 'none'}; busybox needs busybox-static",
        )


def _free_address(lxcpath: Path, name: str) -> ipaddress.IPv4Address:
    """An address in :data:`VETH_SUBNET` that no container in ``lxcpath`` and no host route
    uses, starting from a hash of the name (so a name tends to keep its address)."""
    used: set[str] = set()
    for config in lxcpath.glob("*/config"):
        for line in config.read_text(errors="replace").splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "lxc.net.0.ipv4.address":
                used.add(value.strip().split("/")[0])
    if shutil.which("ip"):
        routes = subprocess.run(
            ["ip", "-4", "-o", "route", "show", "table", "all"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        used.update(line.split()[0].split("/")[0] for line in routes.splitlines() if line)
    hosts = VETH_SUBNET.num_addresses - 2
    start = int(hashlib.sha1(name.encode()).hexdigest(), 16) % hosts
    for i in range(hosts):
        address = VETH_SUBNET.network_address + 1 + (start + i) % hosts
        if str(address) not in used:
            return address
    raise ContainerStateError(f"no free address left in {VETH_SUBNET}")


def _delete_link(name: str) -> None:
    """Delete the host network link ``name`` if it (still) exists."""
    if os.path.exists(f"/sys/class/net/{name}") and shutil.which("ip"):
        subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)
