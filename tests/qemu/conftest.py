"""Fixtures for the QEMU half: the guest kit, a private base directory for every machine the
tests start, and a session-end check that no QEMU process, socket or directory survives."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmkit.qemu import guestkit
from kvmkit.qemu.config import MachineConfig, guest_kit_config
from kvmkit.qemu.errors import GuestKitError


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline and b"qemu-system" in cmdline:
            pids.append(int(entry))
    return pids


@pytest.fixture(scope="session")
def qemu_base() -> Iterator[Path]:
    """Every machine in these tests lives below this directory; at the end of the session
    no QEMU started from it may still run and the directory must be empty."""
    base = Path(tempfile.mkdtemp(prefix="kvmkit-qemu-tests-"))
    yield base
    survivors = _processes_mentioning(str(base))
    for pid in survivors:  # never leave them running, but fail loudly
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    leftovers = sorted(p.name for p in base.iterdir())
    for path in base.iterdir():
        shutil.rmtree(path, ignore_errors=True)
    base.rmdir()
    assert not survivors, f"QEMU processes survived the tests: {survivors}"
    assert not leftovers, f"machine directories survived the tests: {leftovers}"


@pytest.fixture(scope="session")
def guest_kit(qemu_binary: str) -> guestkit.GuestKit:
    """The guest kit, built on first use (downloads the Debian kernel package)."""
    try:
        return guestkit.ensure_kit()
    except GuestKitError as exc:
        # Only a host without Debian's tools lacks the means; anywhere else a failed
        # build is a real failure, never a silent skip.
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            pytest.skip(f"no apt-get/dpkg-deb here to fetch a Debian kernel: {exc}")
        raise


@pytest.fixture
def kit_config(guest_kit: guestkit.GuestKit) -> MachineConfig:
    return guest_kit_config(guest_kit, memory_mib=256)
