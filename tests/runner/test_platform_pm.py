"""ACPI PM timer (24 bits at 3.579545 MHz) and the PM1 event/control blocks."""

from __future__ import annotations

import pytest

from kvmkit.runner.context import GuestExit
from kvmkit.runner.devices.pmtimer import PM_TIMER_HZ, AcpiPm1, AcpiPmTimer


class Clock:
    def __init__(self) -> None:
        self.ns = 123_456_789

    def __call__(self) -> int:
        return self.ns


def test_timer_counts_at_3_579545_mhz_and_wraps_at_24_bits() -> None:
    clock = Clock()
    t = AcpiPmTimer(clock)
    assert t.io_in(0x608, 4) == 0
    clock.ns += 1_000_000_000
    assert t.io_in(0x608, 4) == PM_TIMER_HZ & 0xFFFFFF
    clock.ns += 4_000_000_000  # 5 s: 17,897,725 ticks, past 2^24
    assert t.io_in(0x608, 4) == (5 * PM_TIMER_HZ) & 0xFFFFFF
    assert t.io_in(0x609, 1) == ((5 * PM_TIMER_HZ) >> 8) & 0xFF
    t.io_out(0x608, 4, b"\0\0\0\0")  # read-only
    assert t.io_in(0x608, 4) == (5 * PM_TIMER_HZ) & 0xFFFFFF


def test_timer_on_the_host_clock_advances() -> None:
    t = AcpiPmTimer()
    a = t.io_in(0x608, 4)
    while (b := t.io_in(0x608, 4)) == a:
        pass
    assert b != a


def test_timer_save_load_continues_from_the_saved_count() -> None:
    clock = Clock()
    t = AcpiPmTimer(clock)
    clock.ns += 10_000_000
    state = t.save()
    other = AcpiPmTimer(Clock())
    other.load(state)
    assert other.io_in(0x608, 4) == state["ticks"]


def test_pm1_sci_en_is_always_set_and_status_is_write_one_to_clear() -> None:
    pm = AcpiPm1()
    assert pm.io_in(0x604, 2) & 1
    pm.io_out(0x604, 2, b"\x00\x00")
    assert pm.io_in(0x604, 2) & 1
    pm.status = 0x0101
    pm.io_out(0x600, 2, b"\x01\x00")
    assert pm.io_in(0x600, 2) == 0x0100
    pm.io_out(0x602, 2, b"\x20\x01")  # PM1_EN
    assert pm.io_in(0x602, 2) == 0x0120 and pm.io_in(0x600, 4) == 0x0120_0100
    state = pm.save()
    other = AcpiPm1()
    other.load(state)
    assert other.save() == state


def test_s5_sleep_ends_the_run_like_qemu_powering_off() -> None:
    pm = AcpiPm1()
    pm.io_out(0x604, 2, (0x0001 | (5 << 10)).to_bytes(2, "little"))  # SLP_TYP 5, no SLP_EN
    with pytest.raises(GuestExit) as e:
        pm.io_out(0x604, 2, (0x2000 | 0x0001).to_bytes(2, "little"))  # SLP_TYP 0 + SLP_EN
    assert e.value.code == 0
    off: list[bool] = []
    AcpiPm1(lambda: off.append(True)).io_out(0x605, 1, b"\x20")
    assert off == [True]
