r"""Autostart at host boot: a systemd unit that runs ``kvmkit vm autostart --run``.

::

    path = install_unit()             # /etc/systemd/system/kvmkit-autostart.service, enabled
    uninstall_unit()

The unit is a ``oneshot`` service with ``RemainAfterExit=yes`` and ``KillMode=process``:
the QEMUs it starts are detached and stay when the service stops.  It runs this
Python's kvmkit (``sys.executable -m kvmkit``) with this state directory
(``KVMKIT_STATE_DIR``), so the domains it starts are the ones ``kvmkit vm list`` shows
now.  Enabling is what ``systemctl enable`` does for ``WantedBy=multi-user.target``: a
symlink in ``multi-user.target.wants/``.  Every value is quoted for systemd (``"``, ``\\``,
``%`` and ``$`` escaped; a newline refused).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from kvmkit.domains.errors import DomainError
from kvmkit.domains.store import atomic_write_text
from kvmkit.statedir import state_root

UNIT_NAME = "kvmkit-autostart.service"
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
WANTED_BY = "multi-user.target"


def systemd_quote(value: str, *, expand: bool = True) -> str:
    """``value`` as one double-quoted word systemd reads back unchanged (``expand``:
    the word is on an ``Exec*=`` line, where ``$`` is also special)."""
    if "\n" in value or "\0" in value:
        raise DomainError(f"{value!r} cannot go into a systemd unit (newline or NUL)")
    text = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    if expand:
        text = text.replace("$", "$$")
    return f'"{text}"'


def unit_text(*, python: str | None = None, state_dir: Path | None = None) -> str:
    """The unit file's text (see the module docstring)."""
    python = python or sys.executable
    state = (state_dir or state_root()).absolute()
    command = " ".join(
        systemd_quote(word) for word in (python, "-m", "kvmkit", "vm", "autostart", "--run")
    )
    environment = systemd_quote(f"KVMKIT_STATE_DIR={state}", expand=False)
    return f"""[Unit]
Description=Start the kvmkit domains marked autostart
After=local-fs.target network.target

[Service]
Type=oneshot
RemainAfterExit=yes
# The QEMUs it starts are detached domains: stopping this unit must not kill them.
KillMode=process
Environment={environment}
ExecStart={command}

[Install]
WantedBy={WANTED_BY}
"""


def install_unit(unit_dir: Path | None = None, *, state_dir: Path | None = None) -> Path:
    """Write and enable the unit in ``unit_dir`` (default ``/etc/systemd/system``, then
    ``systemctl daemon-reload``); returns the unit's path."""
    directory = Path(unit_dir or SYSTEM_UNIT_DIR).absolute()
    if not directory.is_dir():
        raise DomainError(f"unit directory {directory} does not exist")
    path = directory / UNIT_NAME
    atomic_write_text(path, unit_text(state_dir=state_dir), mode=0o644)
    wants = directory / f"{WANTED_BY}.wants"
    wants.mkdir(exist_ok=True)
    link = wants / UNIT_NAME
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path("..") / UNIT_NAME)
    _daemon_reload(directory)
    return path


def uninstall_unit(unit_dir: Path | None = None) -> bool:
    """Disable and remove the unit from ``unit_dir``; False when it was not installed."""
    directory = Path(unit_dir or SYSTEM_UNIT_DIR).absolute()
    link = directory / f"{WANTED_BY}.wants" / UNIT_NAME
    found = False
    for path in (link, directory / UNIT_NAME):
        if path.is_symlink() or path.exists():
            path.unlink()
            found = True
    _daemon_reload(directory)
    return found


def _daemon_reload(directory: Path) -> None:
    """Tell a running systemd about the change, only for the system's own unit folder."""
    if directory != SYSTEM_UNIT_DIR or shutil.which("systemctl") is None:
        return
    if not Path("/run/systemd/system").is_dir():  # systemd is not PID 1 here
        return
    subprocess.run(
        ["systemctl", "daemon-reload"], capture_output=True, timeout=60, check=False,
        env={**os.environ, "SYSTEMD_PAGER": ""},
    )  # fmt: skip
