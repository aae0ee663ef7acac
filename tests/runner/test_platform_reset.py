"""The reset paths (0xcf9, 0x92, the 8042's 0xfe) and the 8042's answers to a probe."""

from __future__ import annotations

import pytest

from kvmkit.runner.devices.i8042 import I8042, QUEUE_LIMIT
from kvmkit.runner.devices.reset import (
    Port92,
    PostCodes,
    ResetControl,
    end_run_on_reset,
)
from kvmkit.runner.errors import GuestCrashError


class Resets(list[str]):
    def __call__(self, reason: str) -> None:
        self.append(reason)


def test_reset_control_resets_on_bit_2_and_keeps_bit_1() -> None:
    resets = Resets()
    rc = ResetControl(resets)
    rc.io_out(0xCF9, 1, b"\x02")
    assert rc.io_in(0xCF9, 1) == 0x02 and resets == []
    rc.io_out(0xCF9, 1, b"\x06")
    assert len(resets) == 1 and "0xcf9" in resets[0]
    assert ResetControl(resets).save() == {"value": 0}


def test_port92_resets_on_a_rising_bit_0_and_keeps_a20() -> None:
    resets = Resets()
    p = Port92(resets)
    assert p.io_in(0x92, 1) == 0x02
    p.io_out(0x92, 1, b"\x00")
    assert p.io_in(0x92, 1) == 0x00 and resets == []
    p.io_out(0x92, 1, b"\x03")
    assert len(resets) == 1 and p.io_in(0x92, 1) == 0x02


def test_post_codes_are_counted_and_ignored() -> None:
    post = PostCodes()
    for code in (0x10, 0x20):
        post.io_out(0x80, 1, bytes([code]))
    assert (post.count, post.last, post.io_in(0x80, 1)) == (2, 0x20, 0xFF)


def test_8042_pulse_reset_command_resets() -> None:
    resets = Resets()
    kbc = I8042(resets)
    kbc.io_out(0x64, 1, b"\xfe")
    assert len(resets) == 1 and "0xfe" in resets[0]
    kbc.io_out(0x64, 1, b"\xd1")  # write output port ...
    kbc.io_out(0x60, 1, b"\x02")  # ... with the reset line low
    assert len(resets) == 2


def test_8042_answers_a_probe_without_spinning() -> None:
    kbc = I8042(Resets())
    assert kbc.io_in(0x64, 1) & 0x03 == 0  # nothing to read, ready for input
    kbc.io_out(0x64, 1, b"\xaa")
    assert kbc.io_in(0x64, 1) & 0x01 and kbc.io_in(0x60, 1) == 0x55
    kbc.io_out(0x64, 1, b"\x20")
    mode = kbc.io_in(0x60, 1)
    kbc.io_out(0x64, 1, b"\x60")
    kbc.io_out(0x60, 1, bytes([mode & ~0x01]))
    kbc.io_out(0x64, 1, b"\x20")
    assert kbc.io_in(0x60, 1) == mode & ~0x01
    kbc.io_out(0x60, 1, b"\xff")  # keyboard reset
    assert [kbc.io_in(0x60, 1), kbc.io_in(0x60, 1)] == [0xFA, 0xAA]
    assert not kbc.io_in(0x64, 1) & 0x01


def test_8042_output_is_bounded_and_state_saves() -> None:
    kbc = I8042(Resets())
    for _ in range(100):
        kbc.io_out(0x60, 1, b"\xf4")
    assert len(kbc.queue) == QUEUE_LIMIT
    other = I8042(Resets())
    other.load(kbc.save())
    assert other.save() == kbc.save()


def test_default_reset_handler_ends_the_run_with_a_clear_error() -> None:
    with pytest.raises(GuestCrashError, match="machine reset .*0xcf9"):
        ResetControl(end_run_on_reset).io_out(0xCF9, 1, b"\x06")
