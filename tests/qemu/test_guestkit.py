"""The guest kit builder: from a kernel and module tree the user names, concurrently, and
through `kvmkit guest build|info`."""

from __future__ import annotations

import gzip
import json
import subprocess
import threading
from pathlib import Path

import pytest

from kvmkit.cli import main
from kvmkit.qemu import guestkit
from kvmkit.qemu.errors import GuestKitError


@pytest.fixture
def kernel_tree(guest_kit: guestkit.GuestKit, tmp_path: Path) -> tuple[Path, Path]:
    """A kernel image and a module tree made from the cached kit's real files."""
    tree = tmp_path / "modules" / "6.1.0-test"
    (tree / "kernel").mkdir(parents=True)
    subprocess.run(
        ["cpio", "-id", "--quiet", "lib/modules/*.ko"],
        input=gzip.decompress(guest_kit.initrd.read_bytes()),
        cwd=tmp_path,
        check=True,
    )
    for ko in (tmp_path / "lib/modules").iterdir():
        ko.rename(tree / "kernel" / ko.name)
    return guest_kit.bzimage, tree


def test_concurrent_builds_from_a_named_kernel(
    kernel_tree: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVMKIT_CACHE", str(tmp_path / "cache"))
    image, tree = kernel_tree
    kits: list[guestkit.GuestKit] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            kits.append(guestkit.build_kit(kernel_image=image, modules_dir=tree, force=True))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({k.directory for k in kits}) == 1
    kit = guestkit.load_kit(kits[0].directory)
    assert kit.kernel_version == "6.1.0-test" and kit.boots_pvh
    assert kit.source == f"file:{image}"
    assert kit.modules[-1] == guestkit.MODULES[-1]  # the last one wanted, after its deps
    # Nothing half-built is left beside the kit.
    assert [p.name for p in (tmp_path / "cache" / "guestkit").iterdir()] == ["6.1.0-test"]
    # A second build without force returns the cached kit untouched.
    again = guestkit.build_kit(kernel_image=image, modules_dir=tree)
    assert again.built_at == kit.built_at


def test_build_errors_say_what_is_missing(
    kernel_tree: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVMKIT_CACHE", str(tmp_path / "cache"))
    image, tree = kernel_tree
    with pytest.raises(GuestKitError, match="module tree"):
        guestkit.build_kit(kernel_image=image)
    (tree / "kernel" / "virtio_net.ko").unlink()
    with pytest.raises(GuestKitError, match="virtio_net not found"):
        guestkit.build_kit(kernel_image=image, modules_dir=tree)
    assert [p.name for p in (tmp_path / "cache" / "guestkit").iterdir()] == []


def test_guest_cli_build_and_info(
    kernel_tree: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("KVMKIT_CACHE", str(tmp_path / "cache"))
    image, tree = kernel_tree
    assert main(["guest", "info"]) == 0
    assert "no guest kit cached" in capsys.readouterr().out
    assert main(["guest", "build", "--kernel", str(image), "--modules", str(tree)]) == 0
    out, err = capsys.readouterr()
    assert "6.1.0-test ready" in out and "PVH" in out
    assert "pack initramfs" in err and "7/7" in err  # the progress display
    assert main(["guest", "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [k["kernel_version"] for k in info["kits"]] == ["6.1.0-test"]
    assert info["kits"][0]["boots_pvh"] is True
