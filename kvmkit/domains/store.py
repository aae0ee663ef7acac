"""Where domains live: one folder per domain, its definition and what runs for it.

Layout of ``<state>/vms/<name>/`` (``<state>`` is ``$KVMKIT_STATE_DIR``, else
``$XDG_STATE_HOME/kvmkit``, else ``~/.local/state/kvmkit``; folders are ``0700``)::

    definition.json   the persistent definition (kvmkit.domains.definition)
    state.json        present while a QEMU runs: PID, start time, command line, run dir,
                      the MachineConfig it was launched from
    run-<ns>/         one QEMU's sockets and its log: qmp.sock, console.sock, qemu.log
                      (a fresh folder per launch, so a QEMU that exits late can only ever
                      unlink its own sockets)
    console.log       everything the guest printed on its serial console, across starts
    lock              flock()ed by every verb that changes the domain
    *.qcow2           disks a clone made for this domain

Both JSON files are written atomically (temp file, fsync, rename, fsync of the folder),
so a crash mid-write leaves the old file or the new one, never half of one.  A
``state.json`` that cannot be parsed, is not ours, or names a run folder outside the
domain raises :class:`UntrustedStateError`: nothing is started or signalled on its word.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmkit.domains.definition import Definition, validate_name
from kvmkit.domains.errors import DefinitionError, DomainError, UntrustedStateError
from kvmkit.domains.process import Identity, TrustedProcess, find
from kvmkit.qemu.config import MachineConfig
from kvmkit.statedir import state_root

STATE_VERSION = 1


def atomic_write_json(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON (see :func:`atomic_write_text`)."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def atomic_write_text(path: Path, text: str, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``text`` (file mode ``mode``) so that a reader (or a crash)
    sees the old content or the new, never part of it: temp file, fsync, rename, fsync
    the folder."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass
class RunState:
    """What runs for a domain: the QEMU's identity, the folder of its sockets and the
    configuration it was launched from (a migration destination needs the same)."""

    identity: Identity
    run_dir: str  # a folder name inside the domain's folder
    config: MachineConfig
    accel: str
    accel_reason: str = ""
    started_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "pid": self.identity.pid,
            "create_time": self.identity.create_time,
            "cmdline": list(self.identity.cmdline),
            "run_dir": self.run_dir,
            "config": self.config.to_json(),
            "accel": self.accel,
            "accel_reason": self.accel_reason,
            "started_at": self.started_at,
        }

    @classmethod
    def from_json(cls, data: Any) -> RunState:
        """Parse a state file's content; ValueError naming what is wrong."""
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise ValueError(f"not a version-{STATE_VERSION} state object")
        pid, created, cmdline, run_dir = (
            data.get(k) for k in ("pid", "create_time", "cmdline", "run_dir")
        )
        if isinstance(pid, bool) or not isinstance(pid, int) or not 1 < pid < 1 << 22:
            raise ValueError(f"bad pid {pid!r}")
        if not isinstance(created, int | float) or not 0 < created < 1e12:
            raise ValueError(f"bad start time {created!r}")
        if (
            not isinstance(cmdline, list)
            or not cmdline
            or not all(isinstance(a, str) for a in cmdline)
        ):
            raise ValueError("bad command line")
        if not isinstance(run_dir, str) or not run_dir.startswith("run-") or "/" in run_dir:
            raise ValueError(f"bad run folder {run_dir!r}")
        raw = data.get("config")
        if not isinstance(raw, dict):
            raise ValueError("no launch configuration")
        try:
            config = MachineConfig.from_json(raw)
            config.validate()
        except Exception as exc:  # any malformed content is the same: not trusted
            raise ValueError(f"bad launch configuration: {exc}") from None
        return cls(
            Identity(pid, float(created), tuple(cmdline)),
            run_dir,
            config,
            str(data.get("accel", "")),
            str(data.get("accel_reason", "")),
            float(data.get("started_at") or 0.0),
        )


class DomainStore:
    """All domains of this user (``root`` defaults to :func:`state_root`)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or state_root()) / "vms"

    # -- folders and definitions -----------------------------------------------------------

    def folder(self, name: str) -> Path:
        return self.root / validate_name(name)

    def exists(self, name: str) -> bool:
        return (self.folder(name) / "definition.json").exists()

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(d.name for d in self.root.iterdir() if (d / "definition.json").exists())

    def load_definition(self, name: str) -> Definition:
        path = self.folder(name) / "definition.json"
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise DomainError(f"no domain named {name}", hint="see `kvmkit vm list`") from None
        try:
            definition = Definition.from_json(json.loads(text))
        except (ValueError, DefinitionError) as exc:
            raise DefinitionError(f"{path} is not a valid definition: {exc}") from None
        if definition.name != name:
            raise DefinitionError(f"{path} names domain {definition.name!r}, not {name!r}")
        return definition

    def save_definition(self, definition: Definition) -> None:
        """Write ``definition`` (validated) into its domain's folder, creating it."""
        definition.validate()
        folder = self.folder(definition.name)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)
        atomic_write_json(folder / "definition.json", definition.to_json())

    def remove(self, name: str) -> None:
        """Delete the domain's folder (the caller checked that nothing runs)."""
        shutil.rmtree(self.folder(name))

    # -- run state -------------------------------------------------------------------------

    def read_state(self, name: str) -> RunState | None:
        """The recorded run state, None when none is recorded.  Raises
        UntrustedStateError when the file exists but cannot be read or trusted."""
        path = self.folder(name) / "state.json"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._untrusted(name, path, str(exc)) from None
        try:
            info = os.fstat(fd)
            if info.st_uid != os.getuid() or info.st_mode & 0o022:
                raise self._untrusted(name, path, "it is not owned by you or others can write it")
            with os.fdopen(fd, closefd=False) as f:
                text = f.read(1 << 20)
        finally:
            os.close(fd)
        try:
            return RunState.from_json(json.loads(text))
        except ValueError as exc:
            raise self._untrusted(name, path, str(exc)) from None

    @staticmethod
    def _untrusted(name: str, path: Path, why: str) -> UntrustedStateError:
        return UntrustedStateError(
            f"the state file of domain {name} cannot be trusted ({why}); a QEMU may still"
            " run for it, so kvmkit neither starts nor signals anything",
            hint=f"stop that QEMU yourself if one runs, then delete {path}",
        )

    def write_state(self, name: str, state: RunState) -> None:
        atomic_write_json(self.folder(name) / "state.json", state.to_json())

    def clear_state(self, name: str, state: RunState | None) -> None:
        """Forget the run ``state`` (its QEMU is gone): the state file and its folder."""
        folder = self.folder(name)
        (folder / "state.json").unlink(missing_ok=True)
        if state is not None:
            shutil.rmtree(folder / state.run_dir, ignore_errors=True)

    def find_process(self, name: str) -> tuple[RunState | None, TrustedProcess | None]:
        """The recorded run state and, when its QEMU still runs, that process."""
        state = self.read_state(name)
        if state is None:
            return None, None
        return state, find(state.identity)

    def new_run_dir(self, name: str, keep: str | None = None) -> Path:
        """A fresh run folder, after removing those no QEMU uses (except ``keep``, the
        running QEMU's).  Raises
        UntrustedStateError when one still answers on its QMP socket: a QEMU that no state
        file records (kvmkit died between launch and record) runs for this domain."""
        folder = self.folder(name)
        for stray in folder.glob("run-*"):
            if stray.name == keep:
                continue
            if _answers(stray / "qmp.sock"):
                raise UntrustedStateError(
                    f"a QEMU that no state file records still serves {stray / 'qmp.sock'}",
                    hint=f"stop that QEMU (e.g. QMP quit on that socket), then remove {stray}",
                )
            shutil.rmtree(stray, ignore_errors=True)
        return folder / f"run-{time.time_ns()}"

    # -- lock ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, name: str, timeout: float = 10.0) -> Iterator[None]:
        """Hold the domain's lock (exclusive flock) for the block; DomainError when
        another kvmkit holds it for longer than ``timeout`` seconds."""
        folder = self.folder(name)
        if not folder.is_dir():
            raise DomainError(f"no domain named {name}", hint="see `kvmkit vm list`")
        fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise DomainError(
                            f"domain {name} is busy: another kvmkit command holds its lock",
                            hint="wait for it to finish",
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)


def _answers(path: Path) -> bool:
    """True when something listens on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
