"""Where kvmkit keeps per-user state: ``$KVMKIT_STATE_DIR``, else
``$XDG_STATE_HOME/kvmkit``, else ``~/.local/state/kvmkit``.  The domains layer keeps its
VM definitions under ``vms/``, the containers layer its lxcpath under ``containers/``."""

from __future__ import annotations

import os
from pathlib import Path


def state_root() -> Path:
    """The per-user state directory (it may not exist yet; callers create what they use)."""
    if env := os.environ.get("KVMKIT_STATE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "kvmkit"
