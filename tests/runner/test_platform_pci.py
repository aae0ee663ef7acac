"""PCI configuration mechanism #1, the i440FX host bridge, BARs (assignment, sizing,
moves) and slot conflicts."""

from __future__ import annotations

import struct

import pytest

from kvmkit.runner.bus import Bus
from kvmkit.runner.devices.pci import (
    PCI_IO_WINDOW,
    PCI_MMIO_WINDOW,
    PciBar,
    PciBus,
    PciFunction,
)
from kvmkit.runner.errors import BusError


def cfg_addr(slot: int, fn: int = 0, reg: int = 0, bus: int = 0) -> bytes:
    return struct.pack("<I", 0x80000000 | bus << 16 | slot << 11 | fn << 8 | reg)


def cfg_read(pci: PciBus, slot: int, reg: int, size: int = 4, fn: int = 0) -> int:
    pci.io_out(0xCF8, 4, cfg_addr(slot, fn, reg & 0xFC))
    return pci.io_in(0xCFC + (reg & 3), size)


def cfg_write(pci: PciBus, slot: int, reg: int, value: int, size: int = 4) -> None:
    pci.io_out(0xCF8, 4, cfg_addr(slot, 0, reg & 0xFC))
    pci.io_out(0xCFC + (reg & 3), size, value.to_bytes(size, "little"))


class Regs:
    """A BAR's device: records accesses with their offset into the BAR."""

    name = "regs"

    def __init__(self) -> None:
        self.log: list[tuple[str, int, int]] = []

    def mmio_read(self, offset: int, length: int) -> int:
        self.log.append(("r", offset, length))
        return 0x1234

    def mmio_write(self, offset: int, data: bytes) -> None:
        self.log.append(("w", offset, int.from_bytes(data, "little")))

    def io_in(self, offset: int, size: int) -> int:
        self.log.append(("in", offset, size))
        return 0x56

    def io_out(self, offset: int, size: int, data: bytes) -> None:
        self.log.append(("out", offset, data[0]))


def test_host_bridge_is_i440fx_at_00_00_0() -> None:
    pci = PciBus()
    assert cfg_read(pci, 0, 0) == 0x1237_8086
    assert cfg_read(pci, 0, 0x08) >> 8 == 0x060000
    assert cfg_read(pci, 0, 0x0E, 1) == 0x00  # header type 0
    assert cfg_read(pci, 0, 0x02, 2) == 0x1237 and cfg_read(pci, 0, 0x01, 1) == 0x80


def test_empty_slots_other_buses_and_disabled_accesses_read_all_ones() -> None:
    pci = PciBus()
    assert cfg_read(pci, 5, 0) == 0xFFFFFFFF
    assert cfg_read(pci, 0, 0, fn=1) == 0xFFFFFFFF
    pci.io_out(0xCF8, 4, cfg_addr(0, bus=1))
    assert pci.io_in(0xCFC, 4) == 0xFFFFFFFF
    pci.io_out(0xCF8, 4, b"\0\0\0\0")  # enable bit clear
    assert pci.io_in(0xCFC, 2) == 0xFFFF
    assert pci.io_in(0xCF8, 4) == 0


def test_config_address_takes_only_dword_writes() -> None:
    pci = PciBus()
    pci.io_out(0xCF8, 4, cfg_addr(3, 0, 0x10))
    pci.io_out(0xCF8, 1, b"\x00")
    pci.io_out(0xCFB, 1, b"\x01")  # Linux's pci_check_type1 does this first
    assert pci.io_in(0xCF8, 4) == 0x80001810
    assert pci.io_in(0xCFA, 2) == 0x8000 and pci.io_in(0xCFB, 1) == 0x80


def test_identity_registers_are_read_only() -> None:
    pci = PciBus()
    cfg_write(pci, 0, 0, 0)
    assert cfg_read(pci, 0, 0) == 0x1237_8086


def _device() -> tuple[PciFunction, Regs, Regs]:
    mem, io = Regs(), Regs()
    fn = PciFunction(
        "dev",
        vendor=0x1234,
        device=0x11,
        class_code=0xFF00,
        bars=[PciBar(0, "mmio", 0x1000, mem), PciBar(2, "io", 0x20, io)],
    )
    return fn, mem, io


def test_bars_are_assigned_like_firmware_would_and_route_accesses() -> None:
    pci = PciBus()
    bus = Bus()
    pci.attach(bus)
    fn, mem, io = _device()
    slot = pci.add_function(fn)
    assert slot == 1
    bar0 = cfg_read(pci, 1, 0x10)
    bar2 = cfg_read(pci, 1, 0x18)
    assert PCI_MMIO_WINDOW[0] <= bar0 < PCI_MMIO_WINDOW[1] and bar0 % 0x1000 == 0
    assert bar2 & 1 and PCI_IO_WINDOW[0] <= bar2 & ~3 < PCI_IO_WINDOW[1]
    assert cfg_read(pci, 1, 0x04, 2) & 3 == 3  # I/O and memory decoding on
    assert cfg_read(pci, 1, 0x14) == 0  # unimplemented BAR
    window = bus.mmio_device(bar0 + 8)
    assert window is not None
    assert window.mmio_read(bar0 + 8, 4) == 0x1234
    window.mmio_write(bar0 + 0x10, b"\x07\0\0\0")
    port = bar2 & ~3
    io_window = bus.port_device(port + 3)
    assert io_window is not None
    assert io_window.io_in(port + 3, 1) == 0x56
    assert mem.log == [("r", 8, 4), ("w", 0x10, 7)] and io.log == [("in", 3, 1)]


def test_bar_sizing_by_writing_all_ones() -> None:
    pci = PciBus()
    fn, _, _ = _device()
    pci.add_function(fn, slot=4)
    cfg_write(pci, 4, 0x10, 0xFFFFFFFF)
    assert cfg_read(pci, 4, 0x10) == 0xFFFFF000
    cfg_write(pci, 4, 0x18, 0xFFFFFFFF)
    assert cfg_read(pci, 4, 0x18) == 0xFFFFFFE1


def test_moving_a_bar_moves_its_decoding_and_command_bits_gate_it() -> None:
    pci = PciBus()
    bus = Bus()
    pci.attach(bus)
    fn, mem, _ = _device()
    pci.add_function(fn, slot=2)
    new = 0xF0000000
    cfg_write(pci, 2, 0x10, new)
    assert cfg_read(pci, 2, 0x10) == new
    window = bus.mmio_device(new)
    assert window is not None and window.mmio_read(new + 4, 4) == 0x1234
    assert mem.log[-1] == ("r", 4, 4)
    cfg_write(pci, 2, 0x04, 0, 2)  # decoding off
    assert window.mmio_read(new + 4, 4) == 0xFFFFFFFF
    cfg_write(pci, 2, 0x04, 2, 2)
    assert window.mmio_read(new, 2) == 0x1234


def test_a_taken_slot_is_a_clear_error() -> None:
    pci = PciBus()
    fn, _, _ = _device()
    with pytest.raises(BusError, match="00:00.0 is already taken by i440fx"):
        pci.add_function(fn, slot=0)
    with pytest.raises(BusError, match="does not exist"):
        pci.add_function(fn, slot=32)


@pytest.mark.parametrize(("kind", "size"), [("mmio", 8), ("io", 3), ("dma", 16), ("mmio", 0x3000)])
def test_bad_bars_are_refused(kind: str, size: int) -> None:
    with pytest.raises(BusError):
        PciBar(0, kind, size, Regs())


def test_save_and_load_restore_config_and_decoding() -> None:
    pci = PciBus()
    fn, _, _ = _device()
    pci.add_function(fn, slot=3)
    cfg_write(pci, 3, 0x10, 0xF1000000)
    cfg_write(pci, 3, 0x3C, 11, 1)
    state = pci.save()
    other = PciBus()
    fn2, _, _ = _device()
    other.add_function(fn2, slot=3)
    other.load(state)
    assert cfg_read(other, 3, 0x10) == 0xF1000000 and cfg_read(other, 3, 0x3C, 1) == 11
    assert any(start == 0xF1000000 for start, _, _ in other.decode_map("mmio"))
    with pytest.raises(BusError, match="no function"):
        PciBus().load(state)
