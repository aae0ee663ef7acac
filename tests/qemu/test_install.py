"""Install from an ISO, boot from the disk: `kvmkit guest iso`, `kvmkit vm create --cdrom`,
`kvmkit vm start`, all against real QEMU (TCG) and a real BIOS boot (SeaBIOS, isolinux,
extlinux).

Cost here (2 shared cores): building the ISO ~15 s, the install ~20 s, the boot from the
disk ~10 s; the module builds one ISO for its tests.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmkit.cli import main
from kvmkit.domains import DomainError, DomainStore, install
from kvmkit.qemu import installer, qemu_img


@pytest.fixture(scope="module")
def iso(tmp_path_factory: pytest.TempPathFactory, guest_kit: object) -> Iterator[Path]:
    missing = [t for t in ("xorriso", "extlinux") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} missing: run scripts/ensure-sysdeps.sh")
    folder = tmp_path_factory.mktemp("iso")
    path = folder / "install.iso"
    assert main(["guest", "iso", str(path), "--quiet"]) == 0
    yield path
    shutil.rmtree(folder, ignore_errors=True)


def _ok(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    status = main(["vm", *argv])
    out, err = capsys.readouterr()
    assert status == 0, f"kvmkit vm {' '.join(argv)} failed: {err}"
    return out


def test_iso_is_bootable(iso: Path) -> None:
    data = iso.read_bytes()
    assert data[0x8001:0x8006] == b"CD001"  # ISO 9660 primary volume descriptor
    assert b"EL TORITO SPECIFICATION" in data[0x8800:0x8900]  # the boot record
    assert 5 << 20 < len(data) < 100 << 20


def test_install_then_boot_from_disk(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    qemu_base: Path,
    iso: Path,
) -> None:
    state = qemu_base / "install-state"
    monkeypatch.setenv("KVMKIT_STATE_DIR", str(state))
    try:
        report = json.loads(
            _ok(capsys, "create", "inst", "--cdrom", str(iso), "--disk", "size=64M",
                "--memory", "256M", "--json")
        )  # fmt: skip
        assert report["installer"] == "kvmkit" and report["disk_size"] == 64 << 20
        assert qemu_img.info(report["disk"])["format"] == "qcow2"
        log = Path(report["console_log"]).read_text()
        assert installer.DONE_MARKER in log and "ISOLINUX" in log
        definition = json.loads(_ok(capsys, "dumpconfig", "inst"))
        assert definition["boot"] == {
            "kind": "disk", "kernel": None, "initrd": None, "append": None, "ready_marker": True,
        }  # fmt: skip
        assert [d["target"] for d in definition["disks"]] == ["vda"]

        assert "guest ready" in _ok(capsys, "start", "inst")
        out = _ok(
            capsys, "console", "inst", "-c", "cat /etc/os-release; df -k /; cat /proc/cmdline"
        )
        assert "ID=kvmkit" in out and "/dev/vda1" in out
        assert "root=/dev/vda1" in out and "rdinit" not in out  # booted by extlinux
        size_kib = int(out.split("/dev/vda1")[1].split()[0])
        assert 40_000 < size_kib < 64 * 1024  # the ext4 file system fills the 64M disk
        _ok(capsys, "shutdown", "inst")
    finally:
        main(["vm", "destroy", "inst", "--undefine"])
        capsys.readouterr()
        shutil.rmtree(state, ignore_errors=True)


def test_create_refuses_bad_input(
    monkeypatch: pytest.MonkeyPatch, qemu_base: Path, iso: Path
) -> None:
    import trio

    from kvmkit.domains import Boot, Definition

    state = qemu_base / "install-bad"
    monkeypatch.setenv("KVMKIT_STATE_DIR", str(state))
    spec = install.parse_disk_spec("size=32M")
    try:
        with pytest.raises(DomainError, match="no ISO"):
            trio.run(install.create, Definition("x", boot=Boot("disk")), qemu_base / "no.iso", spec)
        taken = qemu_base / "taken.qcow2"
        taken.write_bytes(b"")
        with pytest.raises(DomainError, match="exists already"):
            trio.run(
                install.create,
                Definition("x", boot=Boot("disk")),
                iso,
                install.parse_disk_spec(f"size=32M,path={taken}"),
            )
        assert taken.read_bytes() == b""  # never overwritten
        assert not DomainStore().exists("x")  # nothing left defined
        taken.unlink()
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_create_times_out_on_an_iso_that_never_powers_off(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    qemu_base: Path,
    tmp_path: Path,
) -> None:
    if shutil.which("xorriso") is None:
        pytest.skip("xorriso missing: run scripts/ensure-sysdeps.sh")
    import subprocess

    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "README").write_text("not bootable\n")
    plain = tmp_path / "plain.iso"
    subprocess.run(
        ["xorriso", "-as", "mkisofs", "-quiet", "-o", str(plain), str(tmp_path / "root")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    state = qemu_base / "install-timeout"
    monkeypatch.setenv("KVMKIT_STATE_DIR", str(state))
    try:
        status = main(["vm", "create", "never", "--cdrom", str(plain), "--disk", "size=32M",
                       "--memory", "64M", "--timeout", "3", "--display", "vnc"])  # fmt: skip
        err = capsys.readouterr().err
        assert status != 0 and "did not finish within 3 s" in err
        assert re.search(r"install: display vnc://127\.0\.0\.1:59\d\d\n", err)  # to watch it
        assert not DomainStore().exists("never")  # nothing left defined, no disk kept
        assert not (state / "vms" / "never").exists()
    finally:
        shutil.rmtree(state, ignore_errors=True)
