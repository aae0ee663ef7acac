"""Fast start: ``kvmkit`` imports only what the sub-command it runs needs.  Checked with
``python -X importtime`` on whole processes (no timing asserted: only which modules)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("trio", "kvmkit.qemu", "kvmkit.qmp", "elftools", "matplotlib", "qemu.qmp")


def imported(*args: str) -> set[str]:
    """The modules ``python -m kvmkit ARGS`` imports (it must exit 0)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "kvmkit", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    assert "kvmkit.cli" in names  # the parse worked
    return names


def heavy(names: set[str], allowed: tuple[str, ...] = ()) -> list[str]:
    return sorted(
        n
        for n in names
        if any(n == h or n.startswith(h + ".") for h in HEAVY)
        and not any(n == a or n.startswith(a + ".") for a in allowed)
    )


@pytest.mark.parametrize("command", ["run", "qmp", "guest", "info", "demo"])
def test_help_of_a_command_imports_nothing_heavy(command: str) -> None:
    assert heavy(imported(command, "--help")) == []


def test_running_a_guest_imports_neither_trio_nor_the_qemu_layer(require_kvm: None) -> None:
    names = imported("run", "hello")
    assert heavy(names, allowed=("elftools",)) == []  # the ELF loader may need pyelftools


def test_top_level_help_still_lists_every_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kvmkit", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, COLUMNS="200"),
    )
    assert proc.returncode == 0
    for command in ("run", "qmp", "vm", "guest", "info", "demo"):
        assert (
            f"    {command} " in proc.stdout
            or f"{{{command}" in proc.stdout
            or command in proc.stdout
        )
