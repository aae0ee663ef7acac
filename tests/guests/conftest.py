"""Fixtures for the guest-program tests: images built once, booted under QEMU TCG."""

from __future__ import annotations

from pathlib import Path

import pytest
from guest_qemu import Boot, BootFn, boot_under_qemu

from kvmkit import guests


@pytest.fixture(scope="session")
def guest_images() -> dict[str, Path]:
    """Every guest program, built once (or taken from the cache)."""
    return guests.build_all_guests()


@pytest.fixture
def boot(qemu_binary: str, guest_images: dict[str, Path], tmp_path: Path) -> BootFn:
    """``boot(name, append="", smp=1, devices=()) -> Boot`` for a bundled guest program."""

    def _boot(name: str, append: str = "", smp: int = 1, devices: tuple[str, ...] = ()) -> Boot:
        return boot_under_qemu(
            qemu_binary, guest_images[name], tmp_path, append=append, smp=smp, devices=devices
        )

    return _boot
