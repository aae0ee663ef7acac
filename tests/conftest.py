"""Test-wide fixtures and guards.

Tests use the real /dev/kvm and a real qemu-system-x86_64.  A test that needs one of them
skips with the reason only when the host truly lacks it; everything else must pass.
"""

from __future__ import annotations

import os
import shutil

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
