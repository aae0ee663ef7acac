"""The device bus and the devices on their own: range conflicts, dispatch lookups, and
each device's register behaviour (hypercalls against real guest memory)."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmkit.kvm import Kvm
from kvmkit.runner.bus import Bus
from kvmkit.runner.context import MAX_MARKS, Console, GuestExit, RunContext
from kvmkit.runner.devices import DebugConsole, DebugExit, FwCfg, Hypercalls, Uart8250
from kvmkit.runner.devices.uart import RX_FIFO
from kvmkit.runner.errors import BusError, GuestCrashError
from kvmkit.runner.machine import RunResult
from kvmkit.runner.stats import MAX_KEYS, OTHER_MMIO, RunStats, VcpuStats


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
    owner = bus.port_device(0x3FC)
    assert owner is not None and owner.name == "uart"


def test_a_long_port_range_is_one_window_with_the_same_rules() -> None:
    bus = Bus()
    window, small = Sink("pci-io"), Sink("small")
    bus.register_ports(0xC000, 0x4000, window)
    assert 0xC000 not in bus.ports  # kept as a range, not 16 Ki entries
    assert bus.port_device(0xC000) is window and bus.port_device(0xFFFF) is window
    assert bus.port_device(0xBFFF) is None
    with pytest.raises(BusError, match=r"port 0xc000 is already claimed by pci-io"):
        bus.register_ports(0xBFFE, 4, small)
    with pytest.raises(BusError, match=r"port 0xd000 is already claimed by pci-io"):
        bus.register_ports(0xD000, 0x100, small)
    bus.register_ports(0x100, 0x200, Sink("low"))
    with pytest.raises(BusError, match=r"port 0x2ff is already claimed by low"):
        bus.register_ports(0x2FF, 1, small)
    bus.register_ports(0xBFF0, 16, small)
    assert [d.name for d in bus.port_devices()] == ["pci-io", "low", "small"]


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


class Lines:
    """An InterruptLines that records the level of each GSI."""

    def __init__(self) -> None:
        self.level: dict[int, bool] = {}
        self.changes = 0

    def set_level(self, gsi: int, level: bool) -> None:
        self.level[gsi] = level
        self.changes += 1

    def pulse(self, gsi: int) -> None:
        raise AssertionError("the UART's line is level-driven")


def test_uart_thr_empty_interrupt_follows_ier_and_iir_reads() -> None:
    lines, console = Lines(), Console(None)
    uart = Uart8250(console, irq=lines)
    assert uart.io_in(0x3FA, 1) == 0x01 and not lines.level  # nothing pending, line untouched
    uart.io_out(0x3F9, 1, b"\x02")  # IER: THR empty
    assert lines.level[4] is True
    assert uart.io_in(0x3FA, 1) == 0x02  # IIR: THR empty ...
    assert lines.level[4] is False  # ... and reading it cleared the cause
    assert uart.io_in(0x3FA, 1) == 0x01
    uart.io_out(0x3F8, 1, b"x")  # a byte goes out at once: THR empty again
    assert lines.level[4] is True and console.text() == "x"
    uart.io_out(0x3F9, 1, b"\x00")
    assert lines.level[4] is False


def test_uart_receive_fifo_data_ready_interrupt_and_limit() -> None:
    lines = Lines()
    uart = Uart8250(Console(None), irq=lines)
    uart.io_out(0x3FA, 1, b"\x01")  # FCR: FIFO on
    uart.io_out(0x3F9, 1, b"\x01")  # IER: received data
    assert 4 not in lines.level or lines.level[4] is False
    assert uart.receive(b"ab") == 2
    assert lines.level[4] is True
    assert uart.io_in(0x3FA, 1) == 0xC4  # FIFOs on + received data
    assert uart.io_in(0x3FD, 1) & 0x01  # LSR: data ready
    assert (uart.io_in(0x3F8, 1), uart.io_in(0x3F8, 1)) == (ord("a"), ord("b"))
    assert lines.level[4] is False and not uart.io_in(0x3FD, 1) & 0x01
    assert uart.receive(bytes(100), timeout=0.05) == RX_FIFO  # bounded: the rest waits
    uart.io_out(0x3FA, 1, b"\x03")  # FCR: clear the receive FIFO
    assert not uart.io_in(0x3FD, 1) & 0x01


def test_uart_loopback_overrun_is_reported_in_lsr() -> None:
    uart = Uart8250(Console(None))
    uart.io_out(0x3FC, 1, b"\x10")  # MCR: loopback
    for _ in range(RX_FIFO + 1):
        uart.io_out(0x3F8, 1, b"L")
    lsr = uart.io_in(0x3FD, 1)
    assert lsr & 0x03 == 0x03  # data ready + overrun
    assert not uart.io_in(0x3FD, 1) & 0x02  # overrun clears when read


def test_uart_save_and_load_round_trip() -> None:
    a_lines, b_lines = Lines(), Lines()
    a = Uart8250(Console(None), irq=a_lines)
    a.io_out(0x3FB, 1, b"\x83")
    a.io_out(0x3F8, 1, b"\x0c")
    a.io_out(0x3FB, 1, b"\x03")
    a.io_out(0x3F9, 1, b"\x01")
    a.io_out(0x3FF, 1, b"\x42")
    a.receive(b"xyz")
    state = a.save()
    json.dumps(state)  # plain JSON
    b = Uart8250(Console(None), irq=b_lines)
    b.load(state)
    assert b.save() == state
    assert b_lines.level[4] is True  # the pending interrupt comes back with the state
    assert bytes(b.io_in(0x3F8, 1) for _ in range(3)) == b"xyz"


def test_puts_outside_guest_ram_is_a_guest_crash_and_long_puts_stream(require_kvm: None) -> None:
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.add_memory(0, 0x400000)
        ctx = RunContext(vm, console=Console(None, limit=16))
        hc = Hypercalls(ctx)
        vm.write(0x1000, struct.pack("<QQ", 0x3FF000, 0x2000))  # runs off the end of RAM
        with pytest.raises(GuestCrashError, match=r"8192 bytes at 0x3ff000"):
            hc.io_out(0x502, 4, (0x1000).to_bytes(4, "little"))
        vm.write(0x1000, struct.pack("<QQ", 0x100000, 1 << 64 - 1))  # absurd length
        with pytest.raises(GuestCrashError, match="not all in guest RAM"):
            hc.io_out(0x502, 4, (0x1000).to_bytes(4, "little"))
        with pytest.raises(GuestCrashError, match="time hypercall"):
            hc.io_out(0x501, 4, (0x7FFFFFF0).to_bytes(4, "little"))
        vm.write(0x200000, b"y" * 0x200000)
        vm.write(0x1000, struct.pack("<QQ", 0x200000, 0x200000))  # 2 MiB, all in RAM
        hc.io_out(0x502, 4, (0x1000).to_bytes(4, "little"))
        assert ctx.console.total == 0x200000 and ctx.console.text() == "y" * 16


def test_per_address_counters_and_marks_are_bounded(require_kvm: None) -> None:
    stats = VcpuStats()
    for addr in range(MAX_KEYS + 500):
        stats.mmio[0xD0000000 + addr] += 1
        stats.unclaimed["mmio", addr] += 1
    assert len(stats.mmio) == MAX_KEYS + 1 and stats.mmio[OTHER_MMIO] == 500
    assert len(stats.unclaimed) == MAX_KEYS + 1
    merged = RunStats.merge([stats, stats], [], 0.0)
    assert len(merged.mmio) == MAX_KEYS + 1 and merged.mmio[OTHER_MMIO] == 1000
    assert merged.to_json()["exits_by_mmio_address"]["other"] == 1000
    with Kvm() as kvm, kvm.create_vm() as vm:
        ctx = RunContext(vm, echo=None)
        for i in range(MAX_MARKS + 10):
            ctx.add_mark("m", i, 0)
        assert len(ctx.marks) == MAX_MARKS and ctx.marks_dropped == 10


class Recorder:
    name = "recorder"

    def __init__(self, ctx: RunContext) -> None:
        self.seen: list[tuple[int, bytes]] = []
        RECORDERS.append(self)

    def io_out(self, port: int, size: int, data: bytes) -> None:
        self.seen.append((port, bytes(data)))

    def io_in(self, port: int, size: int) -> int:
        return 0


RECORDERS: list[Recorder] = []


@pytest.mark.parametrize("python_loop", [False, True])
def test_the_bus_decides_who_answers_a_port_also_for_the_c_fast_path(
    tmp_path: Path, run_image: Callable[..., RunResult], python_loop: bool
) -> None:
    # mov al,'x'; out 0xe9,al; mov eax,5; out 0xf4,eax; spin (the exit port is the user's,
    # so the run goes on until the timeout)
    code = bytes([0xB0, 0x78, 0xE6, 0xE9, 0xB8, 5, 0, 0, 0, 0xE7, 0xF4, 0xEB, 0xFE])
    image = tmp_path / "g.bin"
    image.write_bytes(code)
    RECORDERS.clear()
    r = run_image(
        image,
        load_addr=0x100000,
        python_loop=python_loop,
        port_devices=[(0xE9, 1, Recorder), (0xF4, 1, Recorder)],
        timeout=1.0,
    )
    # the user's devices got both writes; the standard console and exit never did
    assert [seen for rec in RECORDERS for seen in rec.seen] == [
        (0xE9, b"x"),
        (0xF4, (5).to_bytes(4, "little")),
    ]
    assert r.console == "" and r.reason == "timeout"


def test_console_keeps_the_last_bytes_in_bounded_memory() -> None:
    console = Console(None, limit=1000)
    for i in range(200_000):
        console.write(b"%c" % (0x41 + i % 26))
        assert len(console._buf) <= 2 * 1000 + (64 << 10) + 1  # never more than this
    assert console.total == 200_000 and console.dropped == 199_000
    tail = console.text()
    assert len(tail) == 1000 and tail.endswith("ABCDEFGHIJKLMNOPQR"[: (200_000 - 1) % 26 + 1])
