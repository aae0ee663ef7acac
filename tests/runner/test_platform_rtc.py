"""CMOS RTC + NVRAM: time in BCD/binary and 12/24 h, setting the clock, UIP, QEMU's
memory bytes, interrupts on IRQ 8 and register C read-to-clear, save/load."""

from __future__ import annotations

import calendar
import threading

import pytest

from kvmkit.runner.devices.rtc import (
    REG_A,
    REG_B,
    REG_C,
    REG_D,
    RTC_IRQ,
    CmosRtc,
    cmos_memory_bytes,
    periodic_hz,
)
from kvmkit.runner.errors import RunnerError

MiB, GiB = 1 << 20, 1 << 30
# 2026-12-02 17:05:09.5 UTC, a Wednesday
T0 = calendar.timegm((2026, 12, 2, 17, 5, 9, 0, 0, 0)) * 10**9 + 500_000_000


class Lines:
    """Records what the device asks of the interrupt controller."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []
        self.raised = threading.Event()

    def set_level(self, gsi: int, level: bool) -> None:
        self.calls.append((gsi, level))
        if level:
            self.raised.set()

    def pulse(self, gsi: int) -> None:
        self.calls.append((gsi, True))
        self.calls.append((gsi, False))


class Clock:
    def __init__(self, ns: int) -> None:
        self.ns = ns

    def __call__(self) -> int:
        return self.ns


def rtc(clock: Clock | None = None, lines: Lines | None = None, **kw: int) -> CmosRtc:
    kw.setdefault("mem_size", 64 * MiB)
    kw.setdefault("vcpus", 1)
    return CmosRtc(lines or Lines(), clock=clock or Clock(T0), **kw)  # type: ignore[arg-type]


def read(dev: CmosRtc, reg: int) -> int:
    dev.io_out(0x70, 1, bytes([reg]))
    return dev.io_in(0x71, 1)


def write(dev: CmosRtc, reg: int, value: int) -> None:
    dev.io_out(0x70, 1, bytes([reg]))
    dev.io_out(0x71, 1, bytes([value]))


def test_reset_values_are_qemus() -> None:
    dev = rtc()
    assert (read(dev, REG_A), read(dev, REG_B), read(dev, REG_C), read(dev, REG_D)) == (
        0x26,
        0x02,
        0x00,
        0x80,
    )
    assert dev.io_in(0x70, 1) == 0xFF


def test_time_in_bcd_24h() -> None:
    dev = rtc()
    regs = [read(dev, r) for r in (0, 2, 4, 6, 7, 8, 9, 0x32)]
    assert regs == [0x09, 0x05, 0x17, 0x04, 0x02, 0x12, 0x26, 0x20]  # Wed = 4 (Sun = 1)


def test_time_in_binary_and_12h() -> None:
    dev = rtc()
    write(dev, REG_B, 0x04)  # binary, 12-hour
    assert [read(dev, r) for r in (0, 2, 4, 7, 8, 9)] == [9, 5, 0x80 | 5, 2, 12, 26]
    write(dev, REG_B, 0x00)  # BCD, 12-hour
    assert read(dev, 4) == 0x85


def test_the_clock_runs_with_the_host() -> None:
    clock = Clock(T0)
    dev = rtc(clock)
    clock.ns += 61 * 10**9
    assert (read(dev, 2), read(dev, 0)) == (0x06, 0x10)


def test_setting_the_clock_under_set_then_it_runs_from_there() -> None:
    clock = Clock(T0)
    dev = rtc(clock)
    write(dev, REG_B, 0x82)  # SET, 24 h
    for reg, value in (
        (0x32, 0x19),
        (9, 0x99),
        (8, 0x12),
        (7, 0x31),
        (4, 0x23),
        (2, 0x59),
        (0, 0x58),
    ):
        write(dev, reg, value)
    clock.ns += 5 * 10**9  # frozen while SET
    assert read(dev, 0) == 0x58
    write(dev, REG_B, 0x02)
    clock.ns += 2 * 10**9
    assert [read(dev, r) for r in (0, 2, 4, 7, 8, 9, 0x32)] == [
        0x00,
        0x00,
        0x00,
        0x01,
        0x01,
        0x00,
        0x20,
    ]  # 2000-01-01


def test_update_in_progress_only_in_the_last_244_us_of_a_second() -> None:
    clock = Clock(T0 - T0 % 10**9 + 999_900_000)
    dev = rtc(clock)
    assert read(dev, REG_A) & 0x80
    clock.ns += 200_000
    assert not read(dev, REG_A) & 0x80


@pytest.mark.parametrize(
    ("mem", "expect"),
    [
        (64 * MiB, {0x15: 0x80, 0x16: 0x02, 0x17: 0x00, 0x18: 0xFC, 0x30: 0x00, 0x31: 0xFC,
                    0x34: 0x00, 0x35: 0x03, 0x5B: 0, 0x5C: 0, 0x5D: 0}),
        # 3 GiB below 4 GiB (the runner's layout), 3 GiB above: 0xc000 64 KiB units
        (6 * GiB, {0x17: 0xFF, 0x18: 0xFF, 0x34: 0x00, 0x35: 0xBF,
                   0x5B: 0x00, 0x5C: 0xC0, 0x5D: 0x00}),
    ],
)  # fmt: skip
def test_memory_bytes_as_qemu_fills_them(mem: int, expect: dict[int, int]) -> None:
    got = cmos_memory_bytes(mem, 4)
    for addr, value in expect.items():
        assert got[addr] == value, hex(addr)
    assert (got[0x10], got[0x14], got[0x5F]) == (0x00, 0x06, 3)
    dev = rtc(mem_size=mem, vcpus=4)
    assert read(dev, 0x5F) == 3 and read(dev, 0x14) == 0x06


def test_nvram_bytes_are_read_write_and_c_d_read_only() -> None:
    dev = rtc()
    write(dev, 0x40, 0xA5)
    write(dev, REG_D, 0)
    write(dev, REG_C, 0xFF)
    assert (read(dev, 0x40), read(dev, REG_D), read(dev, REG_C)) == (0xA5, 0x80, 0)
    dev.io_out(0x70, 1, bytes([0x80 | 0x40]))  # NMI mask bit does not change the index
    assert dev.io_in(0x71, 1) == 0xA5 and dev.nmi_masked


def test_periodic_rates() -> None:
    assert periodic_hz(0x26) == 1024
    assert periodic_hz(0x2F) == 2
    assert periodic_hz(0x21) == 256  # rates 1 and 2 run as 8 and 9, as on the chip
    assert periodic_hz(0x20) == 0 and periodic_hz(0x66) == 0


def test_update_ended_interrupt_on_irq8_and_reg_c_clears_it() -> None:
    clock = Clock(T0)
    lines = Lines()
    dev = rtc(clock, lines)
    try:
        write(dev, REG_B, 0x12)  # UIE
        clock.ns += 10**9  # the next second began
        assert lines.raised.wait(10), "no interrupt within 10 s"
        assert (RTC_IRQ, True) in lines.calls
        c = read(dev, REG_C)
        assert c & 0x90 == 0x90
        assert lines.calls[-1] == (RTC_IRQ, False)
        assert read(dev, REG_C) == 0
    finally:
        dev.close()


def test_alarm_matches_with_dont_care_fields() -> None:
    clock = Clock(T0)
    lines = Lines()
    dev = rtc(clock, lines)
    try:
        write(dev, 1, 0x10)  # alarm at second 10, any minute and hour
        write(dev, 3, 0xC0)
        write(dev, 5, 0xFF)
        write(dev, REG_B, 0x22)  # AIE
        clock.ns += 10**9  # 17:05:10
        assert lines.raised.wait(10)
        assert read(dev, REG_C) & 0xA0 == 0xA0
    finally:
        dev.close()


def test_periodic_interrupt_uses_the_real_clock() -> None:
    lines = Lines()
    dev = CmosRtc(lines, mem_size=64 * MiB, vcpus=1)
    try:
        write(dev, REG_A, 0x2F)  # 2 Hz
        write(dev, REG_B, 0x42)  # PIE
        assert lines.raised.wait(10)
        assert read(dev, REG_C) & 0xC0 == 0xC0
    finally:
        dev.close()
    dev.close()  # idempotent


def test_flags_without_enables_raise_nothing() -> None:
    clock = Clock(T0)
    lines = Lines()
    dev = rtc(clock, lines)
    clock.ns += 3 * 10**9
    read(dev, REG_C)
    assert lines.calls == []


def test_save_and_load() -> None:
    clock = Clock(T0)
    dev = rtc(clock)
    write(dev, REG_B, 0x86)
    write(dev, 4, 3)
    write(dev, 0x50, 7)
    state = dev.save()
    other = rtc(Clock(T0 + 10**12))
    other.load(state)
    assert (read(other, REG_B), read(other, 4), read(other, 0x50)) == (0x86, 3, 7)
    with pytest.raises(RunnerError, match="128 bytes"):
        other.load({**state, "nvram": [0]})


def test_timer_thread_stops_when_raising_irq8_fails() -> None:
    class Gone(Lines):
        def set_level(self, gsi: int, level: bool) -> None:
            super().set_level(gsi, level)
            raise RunnerError("KVM_IRQ_LINE failed: the VM is closed")

    clock = Clock(T0)
    lines = Gone()
    dev = rtc(clock, lines)
    write(dev, REG_B, 0x12)  # UIE
    clock.ns += 10**9
    assert lines.raised.wait(10)
    dev.close()
    assert dev.timer_error is not None and "closed" in dev.timer_error
