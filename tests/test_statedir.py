"""One state directory for every layer that keeps per-user state."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmkit.containers.lxc import default_lxcpath
from kvmkit.domains.store import DomainStore
from kvmkit.statedir import state_root


def test_env_names_the_state_dir_for_domains_and_containers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVMKIT_STATE_DIR", str(tmp_path / "st"))
    assert state_root() == tmp_path / "st"
    assert default_lxcpath() == tmp_path / "st" / "containers"
    assert DomainStore().root == tmp_path / "st" / "vms"


def test_xdg_state_home_is_the_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVMKIT_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert state_root() == tmp_path / "kvmkit"
    assert default_lxcpath() == tmp_path / "kvmkit" / "containers"
