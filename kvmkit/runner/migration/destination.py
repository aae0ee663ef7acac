"""A migration destination in a process of its own (``kvmkit run --incoming ADDR``), as
on another host: the source shares no interpreter, GIL or core budget with it."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import IO

from kvmkit.childproc import default_signal_dispositions
from kvmkit.runner.migration.errors import MigrationError

#: What ``kvmkit run --incoming`` prints on stderr once it listens (then the address).
READY_LINE = "kvmkit run: waiting for a migrating VM on"


def start_destination(
    address: str,
    *,
    args: Sequence[str] = (),
    stdout: int | IO[bytes] | None = subprocess.DEVNULL,
    timeout: float = 30.0,
) -> subprocess.Popen[bytes]:
    """Start ``kvmkit run --incoming address *args`` and return it once it listens, its
    stderr a pipe that the caller must read (``communicate()``; a destination that
    writes more than a pipe holds there, as ``--json`` puts the console there, waits
    until it is read).  The caller owns the process: it
    must wait for it, or kill it.  :class:`MigrationError` (with what it said) if it
    exits or stays silent for ``timeout`` s instead; it is then killed and reaped."""
    cmd = [sys.executable, "-m", "kvmkit", "run", "--incoming", address, *args]
    dest = subprocess.Popen(
        cmd, stdout=stdout, stderr=subprocess.PIPE, preexec_fn=default_signal_dispositions
    )
    assert dest.stderr is not None
    said = b""
    deadline = time.monotonic() + timeout
    while READY_LINE.encode() not in said:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([dest.stderr], [], [], left)[0]:
            break
        chunk = os.read(dest.stderr.fileno(), 4096)
        if not chunk:  # it exited
            break
        said += chunk
    else:
        return dest
    dest.kill()
    rest = dest.communicate(timeout=30)[1]
    raise MigrationError(
        f"the destination ({' '.join(cmd[2:])}) did not listen: "
        f"{(said + rest).decode(errors='replace')[-400:]}"
    )
