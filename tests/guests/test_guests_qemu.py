"""Every guest program boots under QEMU TCG (multiboot ``-kernel``), prints what it should on
``isa-debugcon`` and exits through ``isa-debug-exit``, whose status is ``(v << 1) | 1``."""

from __future__ import annotations

import calendar
import re
import time

import pytest
from guest_qemu import BootFn

from kvmkit.guests import (
    EXIT_BAD_ARGUMENT,
    EXIT_OK,
    FAULT_EXIT_CODE,
    IO_STORM_PORT,
    MMIO_STORM_ADDR,
    UNMAPPED_ADDR,
    qemu_exit_status,
)

OK = qemu_exit_status(EXIT_OK)
FAULT = qemu_exit_status(FAULT_EXIT_CODE)
BAD_ARG = qemu_exit_status(EXIT_BAD_ARGUMENT)


def test_exit_status_mapping_matches_isa_debug_exit() -> None:
    assert (OK, FAULT, BAD_ARG) == (1, 7, 5)


def test_hello(boot: BootFn) -> None:
    b = boot("hello")
    assert (b.status, b.console) == (OK, "Hello from kvmkit guest\n"), b.stderr


@pytest.mark.parametrize(
    ("append", "cpl", "n", "count"),
    [
        ("n=1000000", 3, 1000000, 78498),
        ("n=100000 cpl=0", 0, 100000, 9592),
        ("cpl=3 n=0x10", 3, 16, 6),  # 2 3 5 7 11 13
        ("n=2", 3, 2, 0),
        ("n=65538", 3, 65538, 6543),  # crosses a segment; 65537 is prime
    ],
)
def test_compute_counts_primes_at_the_asked_cpl(
    boot: BootFn, append: str, cpl: int, n: int, count: int
) -> None:
    b = boot("compute", append)
    assert b.status == OK, b.console
    assert b.console == (
        f"compute: counting primes below {n} at cpl {cpl}\ncompute: {count} primes below {n}\n"
    )


@pytest.mark.parametrize(("append", "cpl", "n"), [("", 3, 10000), ("n=50 cpl=0", 0, 50)])
def test_io_storm(boot: BootFn, append: str, cpl: int, n: int) -> None:
    b = boot("io-storm", append)
    assert (b.status, b.console) == (
        OK,
        f"io-storm: {n} writes to port {IO_STORM_PORT:#x} at cpl {cpl}\n",
    )


@pytest.mark.parametrize(("append", "cpl", "n"), [("n=1000", 3, 1000), ("cpl=0", 0, 10000)])
def test_mmio_storm(boot: BootFn, append: str, cpl: int, n: int) -> None:
    b = boot("mmio-storm", append)
    assert (b.status, b.console) == (
        OK,
        f"mmio-storm: {n} writes, {n // 16} reads at {MMIO_STORM_ADDR:#x} at cpl {cpl}\n",
    )


@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_smp_starts_every_cpu(boot: BootFn, cpus: int) -> None:
    b = boot("smp", smp=cpus)
    assert b.status == OK, b.console
    lines = b.console.splitlines()
    assert lines[0] == f"smp: {cpus} cpus from fw_cfg"
    assert lines[1] == "cpu 0 up (apic id 0)"  # the BSP reports before starting the APs
    ups = [re.fullmatch(r"cpu (\d+) up \(apic id (\d+)\)", line) for line in lines[1:-2]]
    assert all(ups), lines
    indices = sorted(int(m.group(1)) for m in ups if m)
    apic_ids = sorted(int(m.group(2)) for m in ups if m)
    assert indices == list(range(cpus))  # each CPU took one index
    assert apic_ids == list(range(cpus))  # QEMU numbers LAPICs 0..n-1, each reported once
    assert lines[-2:] == [f"all {cpus} cpus up", "apic ids: " + " ".join(map(str, range(cpus)))]


FAULT_LINE = re.compile(
    r"fault: vector (\d+) at RIP 0x([0-9a-f]+), error 0x([0-9a-f]+), cpl (\d)(?:, cr2 0x([0-9a-f]+))?\n"
)


@pytest.mark.parametrize(
    ("fault", "vector", "cpl"),
    [("ud", 6, 0), ("pf", 14, 0), ("gp", 13, 0), ("user-ud", 6, 3), ("user-pf", 14, 3)],
)
def test_exceptions_are_reported_and_exit_with_the_fault_code(
    boot: BootFn, fault: str, vector: int, cpl: int
) -> None:
    b = boot("compute", f"n=100 fault={fault}")
    assert b.status == FAULT, b.console
    m = FAULT_LINE.fullmatch(b.console)
    assert m, b.console
    assert (int(m.group(1)), int(m.group(4))) == (vector, cpl)
    assert 0x100000 <= int(m.group(2), 16) < 0x200000  # a RIP inside the image
    if vector == 14:
        assert int(m.group(5), 16) == UNMAPPED_ADDR
        assert int(m.group(3), 16) & 4 == (4 if cpl == 3 else 0)  # the U/S bit of the error


def test_fault_with_an_empty_idt_shuts_the_cpu_down(boot: BootFn) -> None:
    b = boot("hello", "fault=triple")
    # -no-reboot turns the triple fault's reset into QEMU exiting with status 0.
    assert (b.status, b.console) == (0, "")


@pytest.mark.parametrize(
    ("name", "append", "message"),
    [
        ("compute", "n=12x", "bad value for n=: expected a decimal or 0x-hex number"),
        ("io-storm", "n=", "bad value for n=: expected a decimal or 0x-hex number"),
        ("compute", "n=99999999999999999999", "bad value for n=: "),  # above 2^64
        ("compute", "n=4294967297", "compute: n=4294967297 is too large"),
        ("compute", "n=0xffffffffffffffff", "compute: n=18446744073709551615 is too large"),
        ("mmio-storm", "cpl=1", "bad value for cpl=: expected 0 or 3"),
        ("hello", "fault=segv", "bad value for fault=: expected ud, pf, gp, triple"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    boot: BootFn, name: str, append: str, message: str
) -> None:
    b = boot(name, append)
    assert b.status == BAD_ARG, b.console
    assert b.console.startswith(message) and b.console.endswith("\n")


def test_kvmkit_hypercalls_are_harmless_under_qemu(boot: BootFn) -> None:
    # Every guest writes MARK hypercalls; console=puts sends the output through the PUTS
    # hypercall instead of port 0xe9.  QEMU has no device there: the output vanishes and
    # the guest still exits normally.
    b = boot("hello", "console=puts")
    assert (b.status, b.console) == (OK, "")


def test_image_name_in_the_command_line_is_not_an_argument(boot: BootFn) -> None:
    # QEMU passes "<image> args"; a first token without '=' is skipped, later ones too.
    b = boot("io-storm", "n=7 stray-word cpl=0")
    assert (b.status, b.console) == (
        OK,
        f"io-storm: 7 writes to port {IO_STORM_PORT:#x} at cpl 0\n",
    )


# ---- the pc platform guests under QEMU's own pc machine (the reference) -------------------


@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_timers_fire_through_lapic_pic_and_ioapic(boot: BootFn, cpus: int) -> None:
    b = boot("timers", smp=cpus)
    assert b.status == OK, b.console
    others = f"timers: lapic timer interrupt on each of the other {cpus - 1} cpus: yes\n"
    assert b.console == (
        "timers: lapic timer interrupt on vector 0x30: yes\n"
        "timers: hlt returned once the timer had expired: yes\n"
        "timers: pit irq 0 through the pic on vector 0x20: yes\n"
        "timers: pit irq 0 through the ioapic pin 2 on vector 0x32: yes\n"
    ) + (others if cpus > 1 else "")


def test_rtc_reads_qemus_clock_and_interrupts(boot: BootFn) -> None:
    before = time.time()
    b = boot("rtc")
    after = time.time()
    assert b.status == OK, b.console
    m = re.match(r"rtc: (\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)\n", b.console)
    assert m, b.console
    guest = calendar.timegm(tuple(int(x) for x in m.groups()) + (0, 0, 0))  # type: ignore[arg-type]
    assert before - 2 <= guest <= after + 2
    assert b.console[m.end() :] == (
        "rtc: register d says the time is valid: yes\n"
        "rtc: update-ended interrupt on irq 8: yes\n"
        "rtc: register c said update-ended: yes\n"
    )


@pytest.mark.parametrize("cpus", [1, 4])
def test_acpi_tables_from_seabios(boot: BootFn, cpus: int) -> None:
    b = boot("acpi", smp=cpus)
    assert b.status == OK, b.console
    assert b.console == (
        "acpi: rsdp found, root table checksums valid: yes\n"
        "acpi: fadt: sci irq 9, pm timer at port 0x608, dsdt checksum valid: yes\n"
        f"acpi: madt: {cpus} local apics (matches fw_cfg's cpu count), 1 ioapic at 0xfec00000, "
        "isa irq 0 -> gsi 2\n"
        "acpi: pm timer advances: yes\n"
    )


def test_pci_scan_finds_the_i440fx_and_the_testdev(boot: BootFn) -> None:
    head = (
        "pci: 00:00.0 8086:1237 class 600 header type 0\n"
        "pci: host bridge is an i440fx: yes\n"
        "pci: empty slot 00:1f.0 reads all ones: yes\n"
    )
    b = boot("pci")
    assert (b.status, b.console) == (OK, head)
    b = boot("pci", "testdev=1", devices=("pci-testdev",))
    assert (b.status, b.console) == (
        OK,
        head + "pci: pci-testdev found, bars assigned and enabled: yes\n"
        "pci: pci-testdev mmio test count 1, portio test count 1\n",
    )


def test_pc_testdev_scratch_memory_and_irq_line(boot: BootFn) -> None:
    b = boot("testdev", devices=("pc-testdev",))
    assert (b.status, b.console) == (
        OK,
        "testdev: scratch register reads back by dword, word and byte: yes\n"
        "testdev: iomem keeps what is written: yes\n"
        "testdev: irq 14 raised by the guest arrives through the ioapic: yes\n",
    )
