"""The pvring device and the pvio guest on the real /dev/kvm: the bytes arrive intact
through the UART and through the ring, the exits are what the design says (one per byte
for the UART, none per doorbell for the ring), and a hostile ring ends the run with a
clear error instead of being trusted."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvmkit import guests
from kvmkit.kvm import Kvm
from kvmkit.runner.context import Console, RunContext
from kvmkit.runner.devices.pvring import (
    HEADER_SIZE,
    MAGIC,
    MAX_RING_SIZE,
    PVRING_DOORBELL,
    PVRING_PORT,
    PvRing,
    pvring_port_device,
)
from kvmkit.runner.devices.uart import COM1_PORT, Uart8250
from kvmkit.runner.errors import GuestCrashError
from kvmkit.runner.machine import RunResult

MiB = 1 << 20
Run = Callable[..., RunResult]


def stream(n: int) -> bytes:
    """pvio's data: xorshift32 from seed 1, the low byte of each step."""
    out = bytearray(n)
    x = 1
    for i in range(n):
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        out[i] = x & 0xFF
    return bytes(out)


@pytest.fixture(scope="module")
def pvio(require_kvm: None) -> Path:
    return guests.build_guest("pvio")


def run_pvio(run_image: Run, image: Path, append: str, devices: list[Any]) -> RunResult:
    return run_image(image, append=f"console=puts {append}", port_devices=devices, timeout=120.0)


def test_guest_constants_match_the_device() -> None:
    assert (guests.PVRING_PORT, guests.PVRING_DOORBELL) == (PVRING_PORT, PVRING_DOORBELL)
    assert guests.PVRING_MAGIC == MAGIC and guests.PORT_COM1 == COM1_PORT


def test_uart_sends_every_byte_with_one_exit_each(run_image: Run, pvio: Path) -> None:
    n = 4096
    wire = Console(None, limit=n)
    uart = (COM1_PORT, 8, lambda ctx: Uart8250(wire, irq=ctx.irq))
    baseline = run_pvio(run_image, pvio, "phase=none", [])
    result = run_pvio(run_image, pvio, f"phase=uart n={n}", [uart])
    assert (result.reason, result.exit_code) == ("exit", 0), result.detail
    data = stream(n)
    assert wire.total == n
    assert wire.text() == data.decode("utf-8", "replace")
    assert f"crc32 {zlib.crc32(data):#x}" in result.console
    assert result.stats.ports[COM1_PORT] == n
    assert result.stats.total_exits - baseline.stats.total_exits >= n


def test_ring_data_arrives_intact_and_doorbells_do_not_exit(run_image: Run, pvio: Path) -> None:
    n, batch = 64 << 10, 1024
    made: list[PvRing] = []
    baseline = run_pvio(run_image, pvio, "phase=none", [])
    result = run_pvio(
        run_image, pvio, f"phase=ring n={n} batch={batch} ring=16384", [pvring_port_device(made)]
    )
    assert (result.reason, result.exit_code) == ("exit", 0), result.console + result.detail
    (device,) = made
    stats = device.stats()
    crc = zlib.crc32(stream(n))
    assert stats["consumed"] == n and stats["checksum"] == crc and stats["error"] is None
    assert f"host-crc32 {crc:#x}" in result.console
    # every doorbell reached the eventfd, none exited to the VMM
    assert stats["ioeventfd_doorbells"] == n // batch
    assert stats["exiting_doorbells"] == 0
    assert result.stats.ports[PVRING_DOORBELL] == 0
    assert result.stats.ports[PVRING_PORT] == 1  # the set-up
    # beyond the baseline: the set-up and at most a few kicks of the idle probe
    assert result.stats.total_exits - baseline.stats.total_exits <= 8
    # the device was closed with the boot: its thread is gone
    assert not device.uses_ioeventfd and device._thread is None


def test_ring_without_ioeventfd_exits_once_per_doorbell(run_image: Run, pvio: Path) -> None:
    n, batch = 32 << 10, 4096
    made: list[PvRing] = []
    result = run_pvio(
        run_image,
        pvio,
        f"phase=ring n={n} batch={batch}",
        [pvring_port_device(made, use_ioeventfd=False)],
    )
    assert (result.reason, result.exit_code) == ("exit", 0), result.console + result.detail
    assert result.stats.ports[PVRING_DOORBELL] == n // batch
    assert made[0].stats()["checksum"] == zlib.crc32(stream(n))


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("addr", "outside guest RAM"),
        ("size", f"ring size {1 << 30}: give 1 to {MAX_RING_SIZE} bytes"),
        ("index", "produced index"),
    ],
)
def test_hostile_ring_ends_the_run_with_a_clear_error(
    run_image: Run, pvio: Path, how: str, message: str
) -> None:
    made: list[PvRing] = []
    result = run_pvio(run_image, pvio, f"phase=ring hostile={how}", [pvring_port_device(made)])
    assert result.reason == "crash", (result.reason, result.console)
    assert "pvring:" in result.detail and message in result.detail, result.detail
    assert made[0].error is not None
    if how == "index":
        # the guest saw the rejection in shared memory before its next doorbell exited
        assert "host status 1 after a bad index" in result.console
        assert made[0].stats()["consumed"] == 0


# ---- the device on a real VM without a vCPU ---------------------------------------------


@pytest.fixture
def vm(require_kvm: None) -> Any:
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.add_memory(0, 8 * MiB)
        yield vm


def header(size: int, *, magic: int = MAGIC, produced: int = 0) -> bytes:
    fields = [magic, size, produced, 0, 0, 0, 0, 0]
    return b"".join(f.to_bytes(8, "little") for f in fields)


@pytest.mark.parametrize(
    ("gpa", "head", "message"),
    [
        (0x1004, header(4096), "not 8-byte aligned"),
        (0x1000, header(4096, magic=0x1234), "has magic 0x1234"),
        (0x1000, header(0), "ring size 0"),
        (0x1000, header(MAX_RING_SIZE + 1), f"ring size {MAX_RING_SIZE + 1}"),
        (8 * MiB - 4096, header(8192), "runs past guest RAM"),
        (8 * MiB - 32, b"", "outside guest RAM"),
    ],
)
def test_setup_rejects_a_bad_ring(vm: Any, gpa: int, head: bytes, message: str) -> None:
    if head:
        vm.write(gpa - gpa % 8, head)
    device = PvRing(RunContext(vm, echo=None))
    try:
        with pytest.raises(GuestCrashError, match=message):
            device.io_out(PVRING_PORT, 4, gpa.to_bytes(4, "little"))
        assert device.header is None
    finally:
        device.close()


def test_bad_produced_index_is_rejected_and_bounded(vm: Any) -> None:
    gpa, size = 0x10000, 4096
    vm.write(gpa, header(size))
    device = PvRing(RunContext(vm, echo=None), use_ioeventfd=False)
    try:
        device.io_out(PVRING_PORT, 4, gpa.to_bytes(4, "little"))
        vm.write(gpa + HEADER_SIZE, b"abc")
        vm.write(gpa + 16, (3).to_bytes(8, "little"))
        device.io_out(PVRING_DOORBELL, 4, b"\1\0\0\0")
        assert device.stats()["checksum"] == zlib.crc32(b"abc")
        assert vm.read(gpa + 24, 8) == (3).to_bytes(8, "little")  # consumed
        for produced in (2, 3 + size + 1, 1 << 63):  # backwards, beyond the ring
            device.error = None
            vm.write(gpa + 16, produced.to_bytes(8, "little"))
            with pytest.raises(GuestCrashError, match="produced index"):
                device.io_out(PVRING_DOORBELL, 4, b"\1\0\0\0")
            assert device.consumed == 3
            assert vm.read(gpa + 40, 8) == (1).to_bytes(8, "little")  # status: rejected
    finally:
        device.close()


def test_save_and_load_round_trip_and_refuse_a_bad_size(vm: Any) -> None:
    gpa = 0x20000
    vm.write(gpa, header(256))
    device = PvRing(RunContext(vm, echo=None), use_ioeventfd=False)
    try:
        device.io_out(PVRING_PORT, 4, gpa.to_bytes(4, "little"))
        state = device.save()
        other = PvRing(RunContext(vm, echo=None), use_ioeventfd=False)
        other.load(state)
        assert other.save() == state
        other.close()
        with pytest.raises(Exception, match="ring size"):
            device.load({**state, "size": MAX_RING_SIZE * 2})
    finally:
        device.close()
