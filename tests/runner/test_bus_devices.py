"""The device bus and the devices on their own: range conflicts, dispatch lookups, and
each device's register behaviour (hypercalls against real guest memory)."""

from __future__ import annotations

import struct

import pytest

from kvmkit.kvm import Kvm
from kvmkit.runner.bus import Bus
from kvmkit.runner.context import Console, GuestExit, RunContext
from kvmkit.runner.devices import DebugConsole, DebugExit, FwCfg, Hypercalls, Uart8250
from kvmkit.runner.errors import BusError


class Sink:
    def __init__(self, name: str) -> None:
        self.name = name
        self.writes: list[tuple[int, bytes]] = []

    def io_out(self, port: int, size: int, data: bytes) -> None:
        self.writes.append((port, data))

    def io_in(self, port: int, size: int) -> int:
        return 0

    def mmio_write(self, addr: int, data: bytes) -> None:
        self.writes.append((addr, data))

    def mmio_read(self, addr: int, length: int) -> int:
        return 0


def test_overlapping_port_ranges_are_refused() -> None:
    bus = Bus()
    bus.register_ports(0x3F8, 8, Sink("uart"))
    with pytest.raises(BusError, match=r"port 0x3fc is already claimed by uart"):
        bus.register_ports(0x3FC, 4, Sink("other"))
    with pytest.raises(BusError, match="outside"):
        bus.register_ports(0xFFFF, 2, Sink("wrap"))
    assert 0x3FC not in bus.ports or bus.ports[0x3FC].name == "uart"


def test_overlapping_mmio_ranges_are_refused_and_lookup_finds_the_owner() -> None:
    bus = Bus()
    a, b = Sink("a"), Sink("b")
    bus.register_mmio(0x1000, 0x100, a)
    bus.register_mmio(0x2000, 0x100, b)
    with pytest.raises(BusError, match="overlaps a"):
        bus.register_mmio(0x10F0, 0x20, Sink("c"))
    with pytest.raises(BusError, match="overlaps b"):
        bus.register_mmio(0x1F00, 0x200, Sink("d"))
    bus.register_mmio(0x1100, 0xF00, Sink("between"))
    assert bus.mmio_device(0x10FF) is a and bus.mmio_device(0x2000) is b
    assert bus.mmio_device(0xFFF) is None and bus.mmio_device(0x2100) is None


def test_uart_keeps_registers_and_reports_an_empty_transmitter() -> None:
    console = Console(None)
    uart = Uart8250(console)
    uart.io_out(0x3FB, 1, b"\x83")  # LCR: DLAB on, 8N1
    uart.io_out(0x3F8, 1, b"\x01")  # divisor low
    uart.io_out(0x3F9, 1, b"\x00")
    assert uart.io_in(0x3F8, 1) == 0x01 and console.text() == ""
    uart.io_out(0x3FB, 1, b"\x03")  # DLAB off
    uart.io_out(0x3F8, 1, b"A")
    uart.io_out(0x3F9, 1, b"\x05")
    uart.io_out(0x3FC, 1, b"\x0b")
    uart.io_out(0x3FF, 1, b"\x5a")
    assert console.text() == "A"
    assert uart.io_in(0x3FD, 1) & 0x60 == 0x60  # THRE | TEMT
    assert (
        uart.io_in(0x3F9, 1),
        uart.io_in(0x3FB, 1),
        uart.io_in(0x3FC, 1),
        uart.io_in(0x3FF, 1),
    ) == (5, 3, 0x0B, 0x5A)


def test_fw_cfg_serves_cpu_count_and_ram_size_bytewise() -> None:
    fw = FwCfg(ram_size=64 << 20, cpus=4)

    def read(key: int, n: int) -> bytes:
        fw.io_out(0x510, 2, key.to_bytes(2, "little"))
        return bytes(fw.io_in(0x511, 1) for _ in range(n))

    assert read(0x00, 4) == b"QEMU"
    assert int.from_bytes(read(0x05, 2), "little") == 4
    assert int.from_bytes(read(0x03, 8), "little") == 64 << 20
    assert read(0x1234, 3) == b"\0\0\0"  # unknown keys read as zeros


def test_debug_console_and_exit() -> None:
    console = Console(None)
    DebugConsole(console).io_out(0xE9, 1, b"x")
    assert console.text() == "x"
    with pytest.raises(GuestExit) as info:
        DebugExit().io_out(0xF4, 4, (9).to_bytes(4, "little"))
    assert info.value.code == 9


def test_hypercalls_read_their_arguments_from_guest_memory(require_kvm: None) -> None:
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.add_memory(0, 0x10000)
        ctx = RunContext(vm, echo=None)
        hc = Hypercalls(ctx)
        vm.write(0x2000, b"hello, host")
        vm.write(0x1000, struct.pack("<QQ", 0x2000, 11))
        hc.io_out(0x502, 4, (0x1000).to_bytes(4, "little"))  # puts
        assert ctx.console.text() == "hello, host"
        hc.io_out(0x501, 4, (0x1100).to_bytes(4, "little"))  # time
        assert struct.unpack("<Q", vm.read(0x1100, 8))[0] > 0
        vm.write(0x2100, b"milestone")
        vm.write(0x1200, struct.pack("<QQ", 0x2100, 9))
        hc.io_out(0x504, 4, (0x1200).to_bytes(4, "little"))  # mark
        assert [m.label for m in ctx.marks] == ["milestone"]
        vm.write(0x1300, struct.pack("<Q", 17))
        with pytest.raises(GuestExit) as info:
            hc.io_out(0x503, 4, (0x1300).to_bytes(4, "little"))  # exit
        assert info.value.code == 17
