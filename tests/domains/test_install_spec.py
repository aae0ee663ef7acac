"""`--disk size=...,format=...` and the installer's console reports (no QEMU)."""

from __future__ import annotations

import pytest

from kvmkit.domains import DomainError
from kvmkit.domains.install import DiskSpec, parse_disk_spec
from kvmkit.qemu import installer


def test_disk_spec() -> None:
    assert parse_disk_spec("size=2G,format=qcow2") == DiskSpec(2 << 30, "qcow2", None)
    assert parse_disk_spec("size=1.5") == DiskSpec(3 << 29, "qcow2", None)  # bare: GiB
    assert parse_disk_spec("format=raw,size=64M,path=/a/b.img") == DiskSpec(
        64 << 20, "raw", "/a/b.img"
    )


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "bad disk option"),
        ("format=qcow2", "no size"),
        ("size=1G,size=2G", "bad disk option"),
        ("size=1G,bus=ide", "bad disk option"),
        ("size=1G,format=vmdk", "format"),
        ("size=1K", "too small"),
        ("size=-1G", "not a size"),
        ("size=nanG", "not a size"),
    ],
)
def test_disk_spec_refused(text: str, why: str) -> None:
    with pytest.raises(DomainError, match=why):
        parse_disk_spec(text)


def test_installer_reports() -> None:
    text = (
        "ISOLINUX 6.04\r\nKVMKIT-INSTALL-STEP 1/6 find the disk /dev/vda\r\n"
        "noise KVMKIT-INSTALL-STEP 9/6 not at line start\n"
        "KVMKIT-INSTALL-STEP x/6 bad number\nKVMKIT-INSTALL-FAILED: mke2fs /dev/vda1\n"
    )
    assert installer.scan_console(text) == [
        ("step", 1, "find the disk /dev/vda"),
        ("failed", 0, "mke2fs /dev/vda1"),
    ]
    assert installer.scan_console("KVMKIT-INSTALL-DONE\n")[-1][0] == "done"
    assert installer.scan_console("a Debian installer says nothing of ours") == []
