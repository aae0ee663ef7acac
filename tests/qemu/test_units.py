"""Pieces that need no running guest: cpio, kernel extraction, module order, the command
line, the accelerator choice, qemu-img."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from kvmkit.qemu import cpio, qemu_img
from kvmkit.qemu.accel import choose_accel
from kvmkit.qemu.config import Drive, MachineConfig, build_command
from kvmkit.qemu.errors import QemuError, QemuImgError
from kvmkit.qemu.guestkit import GuestKit
from kvmkit.qemu.kernel import extract_vmlinux, has_pvh_entry, module_depends
from kvmkit.qemu.machine import QemuMachine


def test_cpio_archive_lists_with_the_cpio_tool(tmp_path: Path) -> None:
    entries = [
        cpio.directory("bin"),
        cpio.file("bin/hello", b"hi\n", 0o755),
        cpio.symlink("bin/link", "hello"),
        cpio.chardev("console", 5, 1),
    ]
    archive = tmp_path / "a.cpio"
    archive.write_bytes(cpio.pack(entries))
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"], stdin=archive.open("rb"), capture_output=True, text=True
    )
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert [line.split()[-1] if "->" not in line else line.split()[-3] for line in lines] == [
        "bin",
        "bin/hello",
        "bin/link",
        "console",
    ]
    assert lines[1].startswith("-rwxr-xr-x") and lines[3].startswith("crw-------")
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--quiet"], stdin=archive.open("rb"), cwd=out, check=True)
    assert (out / "bin/hello").read_bytes() == b"hi\n"
    assert (out / "bin/link").readlink() == Path("hello")


def test_guest_kit_kernel_is_pvh_and_modules_ordered(guest_kit: GuestKit) -> None:
    elf = extract_vmlinux(guest_kit.bzimage.read_bytes())
    assert elf is not None and elf[:4] == b"\x7fELF"
    assert has_pvh_entry(elf) == guest_kit.boots_pvh
    assert guest_kit.kernel == (guest_kit.vmlinux or guest_kit.bzimage)
    order = list(guest_kit.modules)
    for wanted in ("virtio_pci", "virtio_blk", "virtio_net", "virtio_balloon"):
        assert wanted in order
    # Every module comes after the modules it depends on.
    assert order.index("virtio_ring") < order.index("virtio") < order.index("virtio_pci")
    assert order.index("net_failover") < order.index("virtio_net")


def test_extract_vmlinux_rejects_garbage() -> None:
    assert extract_vmlinux(b"\xfd7zXZ\x00not really xz" * 3) is None
    assert not has_pvh_entry(b"\x7fELFbroken")


def test_module_depends_reads_modinfo(guest_kit: GuestKit, tmp_path: Path) -> None:
    # The initramfs carries the .ko files: unpack it and read virtio_net's dependencies.
    import gzip

    (tmp_path / "root").mkdir()
    data = gzip.decompress(guest_kit.initrd.read_bytes())
    subprocess.run(
        ["cpio", "-id", "--quiet", "lib/modules/virtio_net.ko"],
        input=data,
        cwd=tmp_path / "root",
        check=True,
    )
    deps = module_depends((tmp_path / "root/lib/modules/virtio_net.ko").read_bytes())
    assert sorted(deps) == ["net_failover", "virtio", "virtio_ring"]


def test_command_line_from_config() -> None:
    config = MachineConfig(
        name="t",
        machine="q35",
        memory_mib=512,
        maxmem_mib=2048,
        memory_slots=2,
        cpus=1,
        maxcpus=4,
        kernel="/k",
        initrd="/i",
        append="console=ttyS0",
        drives=[Drive("/d.qcow2"), Drive("/e.raw", format="raw", readonly=True)],
        network="user",
        balloon=True,
        hotplug_ports=2,
        extra_args=["-rtc", "base=utc"],
    )
    cmd = build_command(
        config, accel="tcg", qmp_socket=Path("/x/q"), console_socket=Path("/x/c"), paused=True
    )
    line = " ".join(cmd)
    assert cmd[cmd.index("-accel") + 1] == "tcg"
    assert cmd[cmd.index("-m") + 1] == "512M,slots=2,maxmem=2048M"
    assert cmd[cmd.index("-smp") + 1] == "1,maxcpus=4"
    assert "pcie-root-port,id=hp0,chassis=1,bus=pcie.0" in cmd
    assert "pcie-root-port,id=hp1,chassis=2,bus=pcie.0" in cmd
    blockdevs = [json.loads(cmd[i + 1]) for i, a in enumerate(cmd) if a == "-blockdev"]
    assert blockdevs[1] == {
        "driver": "qcow2", "file": "disk0-file", "node-name": "disk0", "read-only": False
    }  # fmt: skip
    assert blockdevs[2] == {
        "driver": "file", "filename": "/e.raw", "node-name": "disk1-file", "read-only": True
    }  # fmt: skip
    assert "virtio-blk-pci,drive=disk1,id=disk1,serial=disk1" in cmd
    assert "virtio-balloon-pci,id=balloon0" in cmd
    assert "unix:/x/q,server=on,wait=off" in cmd
    assert "-S" in cmd and line.endswith("-rtc base=utc")
    micro = build_command(
        MachineConfig(machine="microvm", drives=[Drive("/d")]),
        accel="tcg",
        qmp_socket=Path("/q"),
        console_socket=Path("/c"),
    )
    assert "virtio-blk-device,drive=disk0,id=disk0,serial=disk0" in micro


@pytest.mark.parametrize(
    "bad",
    [
        {"machine": "isapc"},
        {"memory_mib": 4},
        {"maxmem_mib": 128, "memory_mib": 256, "memory_slots": 1},
        {"maxmem_mib": 1024},
        {"cpus": 2, "maxcpus": 1},
        {"machine": "microvm", "maxmem_mib": 512, "memory_slots": 1},
    ],
)
def test_config_rejects_impossible_machines(bad: dict[str, object]) -> None:
    with pytest.raises(QemuError):
        MachineConfig(**bad).validate()  # type: ignore[arg-type]


def test_config_json_round_trip() -> None:
    config = MachineConfig(name="a", drives=[Drive("/x", format="raw")], extra_args=["-a"])
    assert MachineConfig.from_json(config.to_json()) == config


def test_accelerator_choice_is_reported() -> None:
    assert choose_accel(backend="pvm").name == "tcg"
    assert "PVM" in choose_accel(backend="pvm").reason
    assert choose_accel(backend="pvm", workload="tiny").name == "kvm"
    assert choose_accel(backend="vmx").name == "kvm"
    assert choose_accel(backend="none").name == "tcg"
    forced = choose_accel("kvm", backend="pvm")
    assert forced.name == "kvm" and forced.forced and "cannot boot" in forced.reason
    assert choose_accel("tcg", backend="svm").name == "tcg"


def test_qemu_img_thin_thick_overlay_convert_snapshots(tmp_path: Path) -> None:
    thin = qemu_img.create(tmp_path / "thin.qcow2", "64M")
    thick = qemu_img.create(tmp_path / "thick.raw", "64M", fmt="raw", preallocation="full")
    assert thin["format"] == "qcow2" and thin["virtual-size"] == 64 * 2**20
    assert thick["format"] == "raw" and thick["actual-size"] >= 64 * 2**20
    assert thin["actual-size"] < 2 * 2**20
    overlay = qemu_img.create(tmp_path / "overlay.qcow2", backing=tmp_path / "thin.qcow2")
    assert overlay["backing-filename"].endswith("thin.qcow2")
    assert overlay["virtual-size"] == 64 * 2**20
    chain = qemu_img.info(tmp_path / "overlay.qcow2", backing_chain=True)["chain"]
    assert [Path(c["filename"]).name for c in chain] == ["overlay.qcow2", "thin.qcow2"]
    flat = qemu_img.convert(tmp_path / "overlay.qcow2", tmp_path / "flat.qcow2")
    assert "backing-filename" not in flat
    qemu_img.snapshot_create(tmp_path / "flat.qcow2", "s1")
    assert [s["name"] for s in qemu_img.snapshot_list(tmp_path / "flat.qcow2")] == ["s1"]
    qemu_img.snapshot_delete(tmp_path / "flat.qcow2", "s1")
    assert qemu_img.snapshot_list(tmp_path / "flat.qcow2") == []
    assert qemu_img.check(tmp_path / "flat.qcow2")["check-errors"] == 0
    with pytest.raises(QemuImgError, match="qemu-img"):
        qemu_img.info(tmp_path / "missing.qcow2")


def test_option_values_are_escaped_in_the_command_line() -> None:
    config = MachineConfig(name="a,b", drives=[Drive("/d/x.img,locking=off", format="raw")])
    cmd = build_command(
        config,
        accel="tcg",
        qmp_socket=Path("/r,un/q"),
        console_socket=Path("/r,un/c"),
        console_log=Path("/r,un/log"),
    )
    assert cmd[cmd.index("-name") + 1] == "a,,b,debug-threads=on"
    assert "unix:/r,,un/q,server=on,wait=off" in cmd
    assert "path=/r,,un/c," in cmd[cmd.index("-chardev") + 1]
    assert "logfile=/r,,un/log," in cmd[cmd.index("-chardev") + 1]
    assert not any("locking" in a and "filename" not in a for a in cmd)


async def test_a_path_with_a_comma_opens_exactly_that_file(
    qemu_base: Path, qemu_binary: str
) -> None:
    folder = qemu_base / "comma,dir"
    folder.mkdir()
    try:
        real = folder / "real.img"
        tricky = folder / "real.img,locking=off"
        qemu_img.create(real, "1M", fmt="raw")
        qemu_img.create(tricky, "2M", fmt="raw")
        config = MachineConfig(name="comma", drives=[Drive(str(tricky), format="raw")])
        # A migration destination stays paused: no guest runs, only QEMU's block layer.
        async with QemuMachine(config, base_dir=folder, incoming="defer") as vm:
            nodes = await vm.qmp.execute("query-named-block-nodes", {"flat": True})
            files = {n["node-name"]: n for n in nodes}
            assert files["disk0"]["file"] == str(tricky)
            assert files["disk0"]["image"]["virtual-size"] == 2 << 20
            assert files["disk0-file"]["file"] == str(tricky)
            assert vm.directory is not None and "," in str(vm.directory)  # sockets too
    finally:
        import shutil

        shutil.rmtree(folder)


def test_qemu_img_names_are_files_not_protocols(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    # Relative names that qemu-img would read as a protocol or as JSON options.
    for name in ("nbd:localhost:1", 'json:{"driver":"null-co"}'):
        assert qemu_img.create(name, "1M", fmt="raw")["virtual-size"] == 1 << 20
        assert (tmp_path / name).is_file()
    with pytest.raises(QemuImgError, match="preallocation"):
        qemu_img.create("x.qcow2", "1M", preallocation="full,cluster_size=512")
