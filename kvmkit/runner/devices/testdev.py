"""QEMU's test devices for its own test kernels (``hw/misc/pc-testdev.c`` and
``hw/misc/pci-testdev.c``), off by default as in QEMU.

``pc-testdev``:
  - ports 0xe0-0xe3: a 32-bit scratch register, readable and writable at any width and
    byte offset; 0xe8-0xeb the same register through byte-wise access;
  - ports 0xe4-0xe7: "flush page" (a 32-bit write of a guest address).  QEMU mprotects the
    page to drop its mappings; the runner has no such side effect: the write is accepted
    and counted in :attr:`PcTestdev.flushes`;
  - ports 0x2000-0x2017: byte writes set ISA/IOAPIC line ``port - 0x2000`` to
    ``data != 0`` (the guest drives interrupt lines);
  - MMIO 0xff000000-0xff00ffff: 64 KiB of scratch memory.

``pci-testdev`` (1b36:0005, class 00ff): BAR 0 4 KiB of MMIO, BAR 1 256 I/O ports, each
offering the ioeventfd tests.  Writing *t* to offset 0 starts test *t* (0 no-eventfd, 1
wildcard-eventfd, 2 datamatch-eventfd) of that BAR's type; the test's header is then
readable from offset 0 (test, width, offset, data, count, name); a write to the header's
offset (of the header's data, for the datamatch test) increments count.  The handlers
here are plain Python: the count is the same as with ioeventfds.
"""

from __future__ import annotations

import struct
import threading

from kvmkit.runner.bus import DeviceState
from kvmkit.runner.devices.pci import PciBar, PciFunction
from kvmkit.runner.irq import IOAPIC_PINS, InterruptLines

TESTDEV_IOPORT = 0xE0
TESTDEV_FLUSH = 0xE4
TESTDEV_IOPORT_BYTE = 0xE8
TESTDEV_IRQ_BASE = 0x2000
TESTDEV_IRQ_COUNT = IOAPIC_PINS
TESTDEV_IOMEM = 0xFF000000
TESTDEV_IOMEM_LEN = 0x10000

PCI_VENDOR_ID_REDHAT = 0x1B36
PCI_DEVICE_ID_REDHAT_TEST = 0x0005
PCI_CLASS_OTHERS = 0x00FF
IOTEST_MEMSIZE = 2048
IOTEST_IOSIZE = 128
IOTEST_DATAMATCH = 0xFA
IOTEST_NOMATCH = 0xCE
IOTEST_TESTS = ("no-eventfd", "wildcard-eventfd", "datamatch-eventfd")
IOTEST_TYPES = ("mmio", "portio")


class PcTestdev:
    """Claims 0xe0-0xeb, 0x2000-0x2017 and the iomem page (see the module docstring)."""

    name = "pc-testdev"

    def __init__(self, irq: InterruptLines) -> None:
        self._irq = irq
        self.ioport_data = 0
        self.flushes = 0
        self.iomem = bytearray(TESTDEV_IOMEM_LEN)
        self.levels = [False] * TESTDEV_IRQ_COUNT

    def io_out(self, port: int, size: int, data: bytes) -> None:
        value = int.from_bytes(data[:size], "little")
        if port >= TESTDEV_IRQ_BASE:
            line = port - TESTDEV_IRQ_BASE
            self.levels[line] = bool(value & 0xFF)
            self._irq.set_level(line, self.levels[line])
        elif TESTDEV_FLUSH <= port < TESTDEV_FLUSH + 4:
            self.flushes += 1
        else:
            shift = 8 * (port & 3)
            mask = (((1 << (8 * size)) - 1) << shift) & 0xFFFFFFFF
            self.ioport_data = (self.ioport_data & ~mask) | ((value << shift) & mask)

    def io_in(self, port: int, size: int) -> int:
        if port >= TESTDEV_IRQ_BASE or TESTDEV_FLUSH <= port < TESTDEV_FLUSH + 4:
            return (1 << (8 * size)) - 1  # write-only in QEMU
        return (self.ioport_data >> (8 * (port & 3))) & ((1 << (8 * size)) - 1)

    def mmio_write(self, addr: int, data: bytes) -> None:
        off = addr - TESTDEV_IOMEM
        data = data[: TESTDEV_IOMEM_LEN - off]
        self.iomem[off : off + len(data)] = data

    def mmio_read(self, addr: int, length: int) -> int:
        off = addr - TESTDEV_IOMEM
        return int.from_bytes(self.iomem[off : off + length].ljust(length, b"\0"), "little")

    def save(self) -> dict[str, object]:
        return {
            "ioport_data": self.ioport_data,
            "flushes": self.flushes,
            "iomem": self.iomem.hex(),
            "levels": [int(v) for v in self.levels],
        }

    def load(self, state: DeviceState) -> None:
        self.ioport_data = int(state["ioport_data"]) & 0xFFFFFFFF
        self.flushes = int(state["flushes"])
        iomem = bytes.fromhex(str(state["iomem"]))
        self.iomem[:] = iomem[:TESTDEV_IOMEM_LEN].ljust(TESTDEV_IOMEM_LEN, b"\0")
        levels = state["levels"]
        if isinstance(levels, list):
            for line, level in enumerate(levels[:TESTDEV_IRQ_COUNT]):
                self.levels[line] = bool(level)
                if level:
                    self._irq.set_level(line, True)


class _IoTest:
    """One test's header, as the guest reads it."""

    def __init__(self, number: int) -> None:
        kind = IOTEST_TYPES[number // len(IOTEST_TESTS)]
        test = IOTEST_TESTS[number % len(IOTEST_TESTS)]
        self.name = f"{kind}-{test}".encode()
        self.match_data = test != "wildcard-eventfd"
        self.data = IOTEST_DATAMATCH if self.match_data else IOTEST_NOMATCH
        size = IOTEST_MEMSIZE if kind == "mmio" else IOTEST_IOSIZE
        self.offset = size + number  # IOTEST_ACCESS_WIDTH is 1
        self.number = number
        self.count = 0

    def header(self) -> bytes:
        return (
            struct.pack("<BBxxIBxxxI", self.number, 1, self.offset, self.data, self.count)
            + self.name
            + b"\0"
        )


class PciTestdev:
    """The pci-testdev function and its two BARs' handlers."""

    name = "pci-testdev"

    def __init__(self) -> None:
        self.tests = [_IoTest(i) for i in range(len(IOTEST_TESTS) * len(IOTEST_TYPES))]
        self.current = -1
        self._lock = threading.Lock()
        self.function = PciFunction(
            "pci-testdev",
            vendor=PCI_VENDOR_ID_REDHAT,
            device=PCI_DEVICE_ID_REDHAT_TEST,
            class_code=PCI_CLASS_OTHERS,
            bars=[
                PciBar(0, "mmio", IOTEST_MEMSIZE * 2, _BarHandler(self, 0)),
                PciBar(1, "io", IOTEST_IOSIZE * 2, _BarHandler(self, 1)),
            ],
        )

    def write(self, kind: int, offset: int, data: bytes) -> None:
        """A write of ``data`` at ``offset`` into BAR ``kind`` (0 MMIO, 1 I/O), byte by
        byte as QEMU's 1-byte implementation splits it."""
        with self._lock:
            for i, byte in enumerate(data):
                addr = offset + i
                if addr == 0:
                    self.current = -1
                    if byte < len(IOTEST_TESTS):
                        self.current = kind * len(IOTEST_TESTS) + byte
                        self.tests[self.current].count = 0
                    continue
                if self.current < 0:
                    continue
                test = self.tests[self.current]
                if addr != test.offset or (test.match_data and byte != test.data):
                    continue
                test.count = (test.count + 1) & 0xFFFFFFFF

    def read(self, offset: int, length: int) -> int:
        with self._lock:
            if self.current < 0:
                return 0
            header = self.tests[self.current].header()
            out = bytearray(length)
            for i in range(length):
                if offset + i + 1 < len(header):
                    out[i] = header[offset + i]
            return int.from_bytes(out, "little")

    def save(self) -> dict[str, object]:
        with self._lock:
            return {
                "current": self.current,
                "counts": [t.count for t in self.tests],
                "function": self.function.save(),
            }

    def load(self, state: DeviceState) -> None:
        with self._lock:
            current = int(state["current"])
            self.current = current if 0 <= current < len(self.tests) else -1
            counts = state["counts"]
            if isinstance(counts, list):
                for test, count in zip(self.tests, counts, strict=False):
                    test.count = int(count) & 0xFFFFFFFF
            fstate = state["function"]
            if isinstance(fstate, dict):
                self.function.load(fstate)


class _BarHandler:
    def __init__(self, dev: PciTestdev, kind: int) -> None:
        self.name = f"pci-testdev-bar{kind}"
        self._dev = dev
        self._kind = kind

    def mmio_write(self, offset: int, data: bytes) -> None:
        self._dev.write(self._kind, offset, data)

    def mmio_read(self, offset: int, length: int) -> int:
        return self._dev.read(offset, length)

    def io_out(self, offset: int, size: int, data: bytes) -> None:
        self._dev.write(self._kind, offset, data[:size])

    def io_in(self, offset: int, size: int) -> int:
        return self._dev.read(offset, size)
