"""``kvmkit run`` with hostile input: numbers that are not finite or not in range, images
that are not regular files or are larger than guest RAM, huge pages that are not there —
each one line of error and a non-zero status, never a traceback, a hang or an unbounded
read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvmkit.cli import main
from kvmkit.kvm.memory import free_hugepages_bytes

REAL_MODE_EXIT_7 = bytes.fromhex("b041e6e9b007e6f4f4")  # print "A", exit 7


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        status = main(["run", *args])
    except SystemExit as exc:  # argparse
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def real_image(tmp_path: Path) -> Path:
    path = tmp_path / "real.bin"
    path.write_bytes(REAL_MODE_EXIT_7)
    return path


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--mem", "infG", "not a size: 'infG'"),
        ("--mem", "1e400G", "not a size: '1e400G'"),
        ("--mem", "-1", "not a size: '-1'"),
        ("--mem", "1K", "too small"),
        ("--mem", "100000T", "too large"),
        ("--timeout", "inf", "give a finite number of seconds above 0"),
        ("--timeout", "nan", "give a finite number of seconds above 0"),
        ("--timeout", "-1", "give a finite number of seconds above 0"),
        ("--timeout", "soon", "not a number of seconds"),
        ("--vcpus", "0", "give 1 to 255 vCPUs"),
        ("--vcpus", "100000", "give 1 to 255 vCPUs"),
        ("--load-addr", "-0x1000", "give an address from 0"),
        ("--load-addr", "0x1" + "0" * 20, "give an address from 0"),
    ],
)
def test_bad_numbers_get_one_line(
    capsys: pytest.CaptureFixture[str], real_image: Path, option: str, value: str, says: str
) -> None:
    status, _out, err = run(capsys, str(real_image), "--mode", "real", f"{option}={value}")
    assert status == 2
    assert err.count("\n") == 1 and says in err and err.startswith("kvmkit run: error: "), err


def test_load_address_outside_ram(
    capsys: pytest.CaptureFixture[str], real_image: Path, require_kvm: None
) -> None:
    status, _out, err = run(capsys, str(real_image), "--load-addr", "0x8000000", "--mem", "64M")
    assert status == 2 and err.count("\n") == 1
    assert "lies outside guest RAM [0, 0x4000000)" in err


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda d: Path("/dev/zero"), "is a character device, not a regular file"),
        (lambda d: d, "is a directory, not a regular file"),
        (lambda d: (os.mkfifo(d / "fifo"), d / "fifo")[1], "is a FIFO, not a regular file"),
    ],
    ids=["dev-zero", "directory", "fifo"],
)
def test_images_must_be_regular_files(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, make: object, says: str
) -> None:
    image = make(tmp_path)  # type: ignore[operator]
    status, _out, err = run(capsys, str(image), "--load-addr", "0x100000")
    assert status == 2 and says in err and err.count("\n") == 1, err


def test_an_image_larger_than_ram_is_refused_before_it_is_read(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    big = tmp_path / "big.bin"
    with big.open("wb") as f:  # sparse: 1 TiB that takes no disk
        f.truncate(1 << 40)
    status, _out, err = run(capsys, str(big), "--load-addr", "0x100000", "--mem", "64M")
    assert status == 2 and err.count("\n") == 1
    assert "image is 0x10000000000 bytes, more than the 0x4000000 bytes of guest RAM" in err


def test_real_mode_runs_from_the_command_line(
    capsys: pytest.CaptureFixture[str], real_image: Path, require_kvm: None
) -> None:
    # Used to crash with a ValueError traceback for every image.
    status, out, err = run(
        capsys, str(real_image), "--mode", "real", "--load-addr", "0x1000", "--timeout", "60"
    )
    assert (status, out, err) == (7, "A", "")


def test_hugepages_when_there_are_none(
    capsys: pytest.CaptureFixture[str], real_image: Path, require_kvm: None
) -> None:
    if free_hugepages_bytes() >= 64 << 20:
        pytest.skip("this host has free huge pages")
    status, _out, err = run(
        capsys, str(real_image), "--mode", "real", "--load-addr", "0x1000", "--hugepages"
    )
    assert status != 0 and err.count("\n") == 1
    assert "explicit huge pages: the guest needs 32 free 2 MiB pages" in err


def test_mem_path_backs_ram_with_a_file_in_the_directory(
    capsys: pytest.CaptureFixture[str], real_image: Path, tmp_path: Path, require_kvm: None
) -> None:
    ram_dir = tmp_path / "ram"
    ram_dir.mkdir()
    status, out, _err = run(
        capsys, str(real_image), "--mode", "real", "--load-addr", "0x1000",
        "--mem-path", str(ram_dir), "--timeout", "60",
    )  # fmt: skip
    assert (status, out) == (7, "A")
    assert list(ram_dir.iterdir()) == []
