"""The PC's CMOS real-time clock and NVRAM (Motorola MC146818) at ports 0x70/0x71.

Behaves as QEMU's ``hw/rtc/mc146818rtc.c`` on the ``pc`` machine:

- port 0x70 selects a register (bit 7 is the NMI mask, kept but without effect; reading
  0x70 gives 0xff), port 0x71 reads or writes it;
- registers 0-9 are the time and date of the host clock (UTC, as QEMU's default
  ``-rtc base=utc``) plus the guest's own offset once it sets the clock, in BCD or binary
  (register B bit 2) and 24- or 12-hour form (register B bit 1, PM in bit 7 of the hour);
  register 0x32 is the century.  Setting register B's SET bit freezes the clock while the
  guest writes the fields; clearing it starts the clock from the written time;
- register A bit 7 (update in progress) is set in the last 244 us of every second, as on
  the chip, so a guest that waits for it to clear before reading never waits long;
- register C holds the interrupt flags (periodic 0x40, alarm 0x20, update-ended 0x10,
  IRQF 0x80), cleared by reading it; when a flag that register B enables is set, IRQ 8 is
  raised (``set_level(8, True)``) and lowered again when the guest reads C;
- register D reads 0x80 (valid RAM and time);
- the NVRAM bytes QEMU's ``pc_cmos_init`` fills in: base memory (0x15/0x16, 640 KiB),
  extended memory (0x17/0x18 and 0x30/0x31, KiB above 1 MiB up to 64 MiB), memory between
  16 MiB and 4 GiB in 64 KiB units (0x34/0x35), memory above 4 GiB in 64 KiB units
  (0x5b-0x5d), floppy types (0x10: none), hard disks (0x12: none), equipment (0x14: FPU +
  PS/2 mouse), boot order (0x3d/0x38: disk, floppy, CD as QEMU's default "cad") and the
  number of CPUs less one (0x5f).

Interrupts come from one timer thread, started when the guest first enables an
interrupt and stopped by :meth:`CmosRtc.close` (the platform closes it when the run ends).
"""

from __future__ import annotations

import calendar
import threading
import time
from collections.abc import Callable

from kvmkit.errors import KvmkitError
from kvmkit.runner.bus import DeviceState
from kvmkit.runner.errors import RunnerError
from kvmkit.runner.irq import InterruptLines

RTC_INDEX_PORT = 0x70
RTC_DATA_PORT = 0x71
RTC_IRQ = 8
NVRAM_SIZE = 128

REG_SECONDS, REG_SECONDS_ALARM = 0x00, 0x01
REG_MINUTES, REG_MINUTES_ALARM = 0x02, 0x03
REG_HOURS, REG_HOURS_ALARM = 0x04, 0x05
REG_DAY_OF_WEEK, REG_DAY_OF_MONTH, REG_MONTH, REG_YEAR = 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
REG_CENTURY = 0x32

REG_A_UIP = 0x80
REG_B_SET, REG_B_PIE, REG_B_AIE, REG_B_UIE = 0x80, 0x40, 0x20, 0x10
REG_B_DM_BINARY, REG_B_24H = 0x04, 0x02
REG_C_IRQF, REG_C_PF, REG_C_AF, REG_C_UF = 0x80, 0x40, 0x20, 0x10

#: How long before each second's end register A shows update-in-progress (the chip's
#: 244 us, as QEMU's UIP_HOLD_LENGTH).
UIP_HOLD_NS = 244_000
#: Alarm registers with both top bits set match any value ("don't care").
ALARM_DONT_CARE = 0xC0
#: Periodic interrupts faster than this are delivered at this rate (lost ticks dropped,
#: as QEMU's lost_tick_policy=discard): a Python timer cannot keep up with 8 kHz.
MAX_PERIODIC_HZ = 1024

_TIME_REGS = (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_DAY_OF_WEEK, REG_DAY_OF_MONTH)
_DATE_REGS = (REG_MONTH, REG_YEAR, REG_CENTURY)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def cmos_memory_bytes(mem_size: int, vcpus: int) -> dict[int, int]:
    """The NVRAM bytes QEMU's ``pc`` machine sets for ``mem_size`` bytes of RAM (below
    4 GiB up to 3 GiB, the rest above 4 GiB, as the runner lays RAM out) and ``vcpus``."""
    below = min(mem_size, 3 * GiB)
    above = mem_size - below
    out: dict[int, int] = {}

    def put16(lo: int, value: int) -> None:
        out[lo], out[lo + 1] = value & 0xFF, (value >> 8) & 0xFF

    put16(0x15, min(below // KiB, 640))
    ext = min((below - MiB) // KiB if below > MiB else 0, 0xFFFF)
    put16(0x17, ext)
    put16(0x30, ext)
    put16(0x34, min((below - 16 * MiB) // (64 * KiB) if below > 16 * MiB else 0, 0xFFFF))
    high = above // (64 * KiB)
    out[0x5B], out[0x5C], out[0x5D] = high & 0xFF, (high >> 8) & 0xFF, (high >> 16) & 0xFF
    out[0x10] = 0x00  # no floppy drives
    out[0x12] = 0x00  # no IDE disks
    out[0x14] = 0x02 | 0x04  # FPU present, PS/2 mouse installed
    out[0x3D] = 0x12  # boot order "cad": hard disk first, then floppy ...
    out[0x38] = 0x30  # ... then CD-ROM; floppy boot signature checked
    out[0x5F] = vcpus - 1
    return out


def _bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


def _from_bcd(value: int) -> int:
    return ((value >> 4) & 0xF) * 10 + (value & 0xF)


def periodic_hz(reg_a: int) -> float:
    """The periodic-interrupt rate that register A selects (0 when off), 32.768 kHz base."""
    rate = reg_a & 0x0F
    if rate == 0 or (reg_a & 0x70) != 0x20:  # rate 0, or the divider is not running
        return 0.0
    if rate <= 2:
        rate += 7
    return 32768 / (1 << (rate - 1))


class CmosRtc:
    """CMOS RTC + NVRAM.  ``clock`` returns the host's wall-clock time in ns (tests pass
    their own); interrupts go to ``irq`` line 8."""

    name = "cmos-rtc"

    def __init__(
        self,
        irq: InterruptLines,
        *,
        mem_size: int,
        vcpus: int,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self._irq = irq
        self._clock = clock
        self._lock = threading.RLock()
        self.nvram = bytearray(NVRAM_SIZE)
        for addr, value in cmos_memory_bytes(mem_size, vcpus).items():
            self.nvram[addr] = value
        self.nvram[REG_A] = 0x26  # 32.768 kHz divider, 1024 Hz periodic rate
        self.nvram[REG_B] = REG_B_24H
        self.nvram[REG_D] = 0x80
        self.index = 0
        self.nmi_masked = False
        #: guest time = host time + offset (ns); while SET is on, the clock stands at frozen_ns
        self.offset_ns = 0
        self.frozen_ns: int | None = None
        self.irq_raised = False
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._next_periodic_ns = 0
        self._last_second: int | None = None  # guest second at the last look for UF/AF
        #: why the timer thread stopped early (raising IRQ 8 failed), else None
        self.timer_error: str | None = None

    # ---- the guest's view ---------------------------------------------------------
    def io_out(self, port: int, size: int, data: bytes) -> None:
        value = data[0]
        with self._lock:
            if port == RTC_INDEX_PORT:
                self.index = value & 0x7F
                self.nmi_masked = bool(value & 0x80)
            else:
                self._write(self.index, value)

    def io_in(self, port: int, size: int) -> int:
        if port == RTC_INDEX_PORT:
            return 0xFF
        with self._lock:
            return self._read(self.index)

    def _now_ns(self) -> int:
        if self.frozen_ns is not None:
            return self.frozen_ns
        return self._clock() + self.offset_ns

    def _time_fields(self, ns: int) -> dict[int, int]:
        t = time.gmtime(ns // 1_000_000_000)
        return {
            REG_SECONDS: t.tm_sec,
            REG_MINUTES: t.tm_min,
            REG_HOURS: t.tm_hour,
            REG_DAY_OF_WEEK: (t.tm_wday + 1) % 7 + 1,  # 1 = Sunday
            REG_DAY_OF_MONTH: t.tm_mday,
            REG_MONTH: t.tm_mon,
            REG_YEAR: t.tm_year % 100,
            REG_CENTURY: t.tm_year // 100,
        }

    def _encode(self, reg: int, value: int) -> int:
        binary = self.nvram[REG_B] & REG_B_DM_BINARY
        if reg == REG_HOURS and not self.nvram[REG_B] & REG_B_24H:
            pm = 0x80 if value >= 12 else 0
            value = value % 12 or 12
            return (value if binary else _bcd(value)) | pm
        return value if binary else _bcd(value)

    def _decode(self, reg: int, raw: int) -> int:
        binary = self.nvram[REG_B] & REG_B_DM_BINARY
        if reg == REG_HOURS and not self.nvram[REG_B] & REG_B_24H:
            hour = (raw & 0x7F) if binary else _from_bcd(raw & 0x7F)
            return hour % 12 + (12 if raw & 0x80 else 0)
        return raw if binary else _from_bcd(raw)

    def _read(self, reg: int) -> int:
        if reg in _TIME_REGS or reg in _DATE_REGS:
            return self._encode(reg, self._time_fields(self._now_ns())[reg])
        if reg == REG_A:
            value = self.nvram[REG_A] & ~REG_A_UIP
            if self._update_in_progress():
                value |= REG_A_UIP
            return value
        if reg == REG_C:
            self._poll_flags()
            value = self.nvram[REG_C]
            self.nvram[REG_C] = 0
            if self.irq_raised:
                self.irq_raised = False
                self._irq.set_level(RTC_IRQ, False)
            return value
        return self.nvram[reg]

    def _update_in_progress(self) -> bool:
        if self.frozen_ns is not None or (self.nvram[REG_A] & 0x70) != 0x20:
            return False
        return self._now_ns() % 1_000_000_000 >= 1_000_000_000 - UIP_HOLD_NS

    def _write(self, reg: int, value: int) -> None:
        if reg in _TIME_REGS or reg in _DATE_REGS:
            self._set_field(reg, value)
        elif reg == REG_A:
            self.nvram[REG_A] = value & 0x7F  # UIP is read-only
            self._next_periodic_ns = 0
        elif reg == REG_B:
            old = self.nvram[REG_B]
            if value & REG_B_SET:
                value &= ~REG_B_UIE  # as the chip: SET clears UIE
                if self.frozen_ns is None:
                    self.frozen_ns = self._now_ns()
            elif old & REG_B_SET and self.frozen_ns is not None:
                self.offset_ns = self.frozen_ns - self._clock()
                self.frozen_ns = None
            self.nvram[REG_B] = value
            self._raise_if_pending()
        elif reg in (REG_C, REG_D):
            pass  # read-only
        else:
            self.nvram[reg] = value
        self._reschedule()

    def _set_field(self, reg: int, raw: int) -> None:
        """The guest wrote one time or date field: the clock now runs from there."""
        now = self._now_ns()
        fields = self._time_fields(now)
        fields[reg] = self._decode(reg, raw)
        year = fields[REG_CENTURY] * 100 + fields[REG_YEAR]
        month = min(max(fields[REG_MONTH], 1), 12)
        secs = calendar.timegm(
            (
                year,
                month,
                min(max(fields[REG_DAY_OF_MONTH], 1), 31),
                min(fields[REG_HOURS], 23),
                min(fields[REG_MINUTES], 59),
                min(fields[REG_SECONDS], 59),
                0,
                0,
                0,
            )
        )
        new = secs * 1_000_000_000 + now % 1_000_000_000
        if self.frozen_ns is not None:
            self.frozen_ns = new
        else:
            self.offset_ns = new - self._clock()

    # ---- interrupts -------------------------------------------------------------------
    def _enabled(self) -> int:
        return self.nvram[REG_B] & (REG_B_PIE | REG_B_AIE | REG_B_UIE)

    def _raise_if_pending(self) -> None:
        flags = self.nvram[REG_C] & (REG_C_PF | REG_C_AF | REG_C_UF)
        if flags & self._enabled():  # PF/AF/UF sit on the same bits as PIE/AIE/UIE
            self.nvram[REG_C] |= REG_C_IRQF
            if not self.irq_raised:
                self.irq_raised = True
                self._irq.set_level(RTC_IRQ, True)

    def _alarm_matches(self, fields: dict[int, int]) -> bool:
        for alarm, reg in (
            (REG_SECONDS_ALARM, REG_SECONDS),
            (REG_MINUTES_ALARM, REG_MINUTES),
            (REG_HOURS_ALARM, REG_HOURS),
        ):
            raw = self.nvram[alarm]
            if raw & ALARM_DONT_CARE == ALARM_DONT_CARE:
                continue
            if self._decode(reg, raw) != fields[reg]:
                return False
        return True

    def _poll_flags(self) -> None:
        """Set the flags whose moment has passed since the last look (called by the timer
        thread and before register C is read)."""
        now_host = self._clock()
        hz = periodic_hz(self.nvram[REG_A])
        if hz:
            period = int(1e9 / min(hz, MAX_PERIODIC_HZ))
            if self._next_periodic_ns == 0:
                self._next_periodic_ns = now_host + period
            elif now_host >= self._next_periodic_ns:
                self.nvram[REG_C] |= REG_C_PF
                self._next_periodic_ns = now_host + period  # missed ticks are dropped
        if self.frozen_ns is None and (self.nvram[REG_A] & 0x70) == 0x20:
            second = (now_host + self.offset_ns) // 1_000_000_000
            last = self._last_second
            if last is not None and second != last:
                self.nvram[REG_C] |= REG_C_UF
                if self._alarm_matches(self._time_fields(second * 1_000_000_000)):
                    self.nvram[REG_C] |= REG_C_AF
            self._last_second = second
        self._raise_if_pending()

    def _next_event_ns(self) -> int:
        """Host time of the next flag the enabled interrupts wait for."""
        now_host = self._clock()
        candidates = []
        if self.nvram[REG_B] & REG_B_PIE and periodic_hz(self.nvram[REG_A]):
            candidates.append(self._next_periodic_ns or now_host)
        if self.nvram[REG_B] & (REG_B_AIE | REG_B_UIE) and self.frozen_ns is None:
            guest = now_host + self.offset_ns
            candidates.append(now_host + 1_000_000_000 - guest % 1_000_000_000)
        return min(candidates) if candidates else now_host + 1_000_000_000

    def _reschedule(self) -> None:
        if self._enabled() and self._thread is None and not self._closed:
            self._last_second = (self._clock() + self.offset_ns) // 1_000_000_000
            self._thread = threading.Thread(target=self._timer, name="cmos-rtc", daemon=True)
            self._thread.start()
        self._wake.notify_all()

    def _timer(self) -> None:
        with self._lock:
            while not self._closed:
                try:
                    self._poll_flags()
                except KvmkitError as exc:  # the VM went away under us: stop, say why
                    self.timer_error = str(exc)
                    return
                delay = (self._next_event_ns() - self._clock()) / 1e9
                self._wake.wait(max(delay, 0.0005))

    def close(self) -> None:
        """Stop the timer thread (idempotent).  The caller must not hold the device's lock."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    # ---- snapshot --------------------------------------------------------------------
    def save(self) -> dict[str, object]:
        with self._lock:
            return {
                "nvram": list(self.nvram),
                "index": self.index,
                "nmi_masked": self.nmi_masked,
                "offset_ns": self.offset_ns,
                "frozen_ns": self.frozen_ns,
                "irq_raised": self.irq_raised,
            }

    def load(self, state: DeviceState) -> None:
        with self._lock:
            nvram = state["nvram"]
            if not isinstance(nvram, list) or len(nvram) != NVRAM_SIZE:
                raise RunnerError(f"cmos-rtc state: nvram must be a list of {NVRAM_SIZE} bytes")
            self.nvram[:] = bytes(nvram)
            self.index = int(state["index"])
            self.nmi_masked = bool(state["nmi_masked"])
            self.offset_ns = int(state["offset_ns"])
            frozen = state["frozen_ns"]
            self.frozen_ns = None if frozen is None else int(frozen)
            self.irq_raised = bool(state["irq_raised"])
            self._next_periodic_ns = 0
            if self.irq_raised:
                self._irq.set_level(RTC_IRQ, True)
            self._reschedule()
