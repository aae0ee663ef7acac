"""QEMU's pc-testdev and pci-testdev, as their sources behave."""

from __future__ import annotations

import struct

from kvmkit.runner.devices.testdev import (
    IOTEST_DATAMATCH,
    IOTEST_IOSIZE,
    IOTEST_MEMSIZE,
    IOTEST_NOMATCH,
    TESTDEV_IOMEM,
    PciTestdev,
    PcTestdev,
)


class Lines:
    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []

    def set_level(self, gsi: int, level: bool) -> None:
        self.calls.append((gsi, level))

    def pulse(self, gsi: int) -> None:
        self.calls += [(gsi, True), (gsi, False)]


def test_scratch_register_at_any_width_and_offset() -> None:
    dev = PcTestdev(Lines())
    dev.io_out(0xE0, 4, struct.pack("<I", 0x11223344))
    assert dev.io_in(0xE0, 4) == 0x11223344
    assert dev.io_in(0xE1, 2) == 0x2233 and dev.io_in(0xE3, 1) == 0x11
    dev.io_out(0xE2, 1, b"\xaa")
    assert dev.io_in(0xE8, 4) == 0x11AA3344
    dev.io_out(0xEA, 2, b"\x01\x02")
    assert dev.io_in(0xE0, 4) == 0x02013344


def test_irq_lines_follow_the_guest_and_flush_is_counted() -> None:
    lines = Lines()
    dev = PcTestdev(lines)
    dev.io_out(0x2000 + 10, 1, b"\x01")
    dev.io_out(0x2000 + 10, 1, b"\x00")
    dev.io_out(0x2000 + 23, 1, b"\x05")
    assert lines.calls == [(10, True), (10, False), (23, True)]
    dev.io_out(0xE4, 4, struct.pack("<I", 0x5000))
    assert dev.flushes == 1
    state = dev.save()
    lines2 = Lines()
    other = PcTestdev(lines2)
    other.load(state)
    assert lines2.calls == [(23, True)] and other.flushes == 1


def test_iomem_is_64k_of_scratch_memory() -> None:
    dev = PcTestdev(Lines())
    dev.mmio_write(TESTDEV_IOMEM + 0x100, struct.pack("<Q", 0x0102030405060708))
    assert dev.mmio_read(TESTDEV_IOMEM + 0x100, 8) == 0x0102030405060708
    assert dev.mmio_read(TESTDEV_IOMEM + 0x104, 2) == 0x0304
    dev.mmio_write(TESTDEV_IOMEM + 0xFFFE, b"\x01\x02\x03\x04")  # clipped at the end
    assert dev.mmio_read(TESTDEV_IOMEM + 0xFFFE, 2) == 0x0201


def header(dev: PciTestdev, bar: int) -> tuple[int, int, int, int, int, bytes]:
    raw = bytes(dev.read(i, 1) for i in range(40))
    test, width, offset, data, count = struct.unpack_from("<BBxxIBxxxI", raw)
    return test, width, offset, data, count, raw[16:].split(b"\0")[0]


def test_pci_testdev_identity_and_bars() -> None:
    dev = PciTestdev()
    cfg = dev.function.config
    assert struct.unpack_from("<HH", cfg, 0) == (0x1B36, 0x0005)
    assert struct.unpack_from("<H", cfg, 0x0A)[0] == 0x00FF
    assert dev.function.bars[0].size == 2 * IOTEST_MEMSIZE and dev.function.bars[0].kind == "mmio"
    assert dev.function.bars[1].size == 2 * IOTEST_IOSIZE and dev.function.bars[1].kind == "io"
    assert dev.read(0, 4) == 0  # no test selected


def test_pci_testdev_mmio_and_portio_tests_count_matching_writes() -> None:
    dev = PciTestdev()
    dev.write(0, 0, b"\x02")  # mmio-datamatch-eventfd
    test, width, offset, data, count, name = header(dev, 0)
    assert (test, width, offset, data, count, name) == (
        2, 1, IOTEST_MEMSIZE + 2, IOTEST_DATAMATCH, 0, b"mmio-datamatch-eventfd"
    )  # fmt: skip
    dev.write(0, offset, bytes([IOTEST_DATAMATCH]))
    dev.write(0, offset, b"\x00")  # wrong data: not counted
    dev.write(0, offset + 1, bytes([IOTEST_DATAMATCH]))  # wrong offset
    assert header(dev, 0)[4] == 1
    dev.write(1, 0, b"\x01")  # portio-wildcard-eventfd
    test, _, offset, data, count, name = header(dev, 1)
    assert (test, offset, data, count, name) == (
        4,
        IOTEST_IOSIZE + 4,
        IOTEST_NOMATCH,
        0,
        b"portio-wildcard-eventfd",
    )
    for value in (1, 2, 3):
        dev.write(1, offset, bytes([value]))
    assert header(dev, 1)[4] == 3
    state = dev.save()
    dev.write(1, 0, b"\x07")  # out of range: no test
    assert dev.read(0, 4) == 0
    dev.load(state)
    assert header(dev, 1)[4] == 3
