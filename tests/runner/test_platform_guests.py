"""The pc platform seen from inside: the bundled platform guests under the runner on the
real /dev/kvm, the RTC against the host clock, the platform installed on a real VM, and
the --device option."""

from __future__ import annotations

import calendar
import re
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmkit.kvm import Kvm
from kvmkit.kvm.irqroute import IOAPIC, PIC_MASTER, PIC_SLAVE, IrqchipRoute, pc_routes
from kvmkit.runner.bus import Bus
from kvmkit.runner.errors import BusError, ImageError, RunnerError
from kvmkit.runner.irq import IrqChipLines
from kvmkit.runner.machine import RunResult
from kvmkit.runner.platform import (
    install_pc_platform,
)

MiB = 1 << 20


@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_timers_lapic_pit_pic_ioapic_and_hlt(
    guest_image: Callable[[str], Path], run_image: Callable[..., RunResult], cpus: int
) -> None:
    r = run_image(guest_image("timers"), vcpus=cpus)
    assert (r.reason, r.exit_code) == ("exit", 0), r.console
    assert r.console.count(": yes\n") == (4 if cpus == 1 else 5) and ": no" not in r.console
    if cpus > 1:
        assert f"on each of the other {cpus - 1} cpus: yes" in r.console


def test_rtc_reads_the_host_clock_and_interrupts(
    guest_image: Callable[[str], Path], run_image: Callable[..., RunResult]
) -> None:
    before = time.time()
    r = run_image(guest_image("rtc"))
    after = time.time()
    assert (r.reason, r.exit_code) == ("exit", 0), r.console
    m = re.search(r"^rtc: (\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)$", r.console, re.M)
    assert m, r.console
    guest = calendar.timegm(tuple(int(x) for x in m.groups()) + (0, 0, 0))  # type: ignore[arg-type]
    assert before - 2 <= guest <= after + 2, (m.group(0), before, after)
    assert "update-ended interrupt on irq 8: yes" in r.console


@pytest.mark.parametrize("cpus", [1, 4])
def test_acpi_tables_walked_by_the_guest(
    guest_image: Callable[[str], Path], run_image: Callable[..., RunResult], cpus: int
) -> None:
    r = run_image(guest_image("acpi"), vcpus=cpus)
    assert (r.reason, r.exit_code) == ("exit", 0), r.console
    assert f"madt: {cpus} local apics (matches fw_cfg's cpu count)" in r.console
    assert "pm timer at port 0x608" in r.console and "pm timer advances: yes" in r.console


def test_pci_scan_and_pci_testdev(
    guest_image: Callable[[str], Path], run_image: Callable[..., RunResult]
) -> None:
    r = run_image(guest_image("pci"))
    assert (r.reason, r.exit_code) == ("exit", 0), r.console
    assert r.console.startswith("pci: 00:00.0 8086:1237 class 600 header type 0\n")
    r = run_image(guest_image("pci"), append="testdev=1", devices=("pci-testdev",))
    assert (r.reason, r.exit_code) == ("exit", 0), r.console
    assert "mmio test count 1, portio test count 1" in r.console
    r = run_image(guest_image("pci"), append="testdev=1")  # not asked for: not there
    assert (r.reason, r.exit_code) == ("exit", 1) and "no pci-testdev" in r.console


def test_install_writes_the_tables_and_claims_the_ports(require_kvm: None) -> None:
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.add_memory(0, 16 * MiB)
        vm.create_irqchip()
        vm.create_pit2()
        bus = Bus()
        platform = install_pc_platform(
            bus, vm, IrqChipLines(vm), mem_size=16 * MiB, vcpus=2, devices=["pc-testdev"]
        )
        try:
            rsdp = vm.read(platform.acpi.rsdp, 36)
            assert rsdp[:8] == b"RSD PTR " and sum(rsdp) % 256 == 0
            madt = platform.acpi.addresses["APIC"]
            length = struct.unpack("<I", vm.read(madt + 4, 4))[0]
            assert sum(vm.read(madt, length)) % 256 == 0
            for port in (0x60, 0x64, 0x70, 0x71, 0x80, 0x92, 0x600, 0x604, 0x608, 0xCF8, 0xCF9,
                         0xCFC, 0xCFF, 0xE0, 0x2000, 0x2017):  # fmt: skip
                assert bus.port_device(port) is not None, hex(port)
            assert bus.port_device(0x700) is None  # io-storm's port stays unclaimed
            assert bus.mmio_device(0xFF000000) is platform.devices["pc-testdev"]
            platform.devices["pc-testdev"].io_out(0x2005, 1, b"\x01")  # KVM_IRQ_LINE
            state = platform.save()
            platform.load(state)
            with pytest.raises(RunnerError, match="lacks"):
                platform.load({"nonesuch": {}})
        finally:
            platform.close()
        with pytest.raises(BusError, match="already claimed"):
            install_pc_platform(bus, vm, IrqChipLines(vm), mem_size=16 * MiB, vcpus=1)


def test_routing_sends_irq0_to_ioapic_pin_2_as_the_madt_says() -> None:
    routes = pc_routes()
    assert IrqchipRoute(0, IOAPIC, 2) in routes and IrqchipRoute(0, PIC_MASTER, 0) in routes
    assert not [r for r in routes if r.gsi == 2]
    assert IrqchipRoute(8, PIC_SLAVE, 0) in routes and IrqchipRoute(8, IOAPIC, 8) in routes


@pytest.mark.parametrize(
    ("devices", "match"),
    [(["floppy"], "unknown device"), (["pc-testdev", "pc-testdev"], "given twice")],
)
def test_bad_device_lists_are_refused(require_kvm: None, devices: list[str], match: str) -> None:
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.add_memory(0, 16 * MiB)
        vm.create_irqchip()
        with pytest.raises(RunnerError, match=match):
            install_pc_platform(
                Bus(), vm, IrqChipLines(vm), mem_size=16 * MiB, vcpus=1, devices=devices
            )


def test_cli_device_option(guest_image: Callable[[str], Path]) -> None:
    run = [sys.executable, "-m", "kvmkit", "run", "pci", "--timeout", "60"]
    ok = subprocess.run(
        [*run, "--device", "pci-testdev", "--append", "testdev=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0 and "portio test count 1" in ok.stdout, ok.stderr
    bad = subprocess.run([*run, "--device", "floppy"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


# A flat long-mode image at 1 MiB that does one port write and halts: the reset and
# power-off paths end the run instead of leaving it to spin or halt.
RESET_WRITES = {
    "cf9": b"\xb0\x06\x66\xba\xf9\x0c\xee",  # mov al,6; mov dx,0xcf9; out dx,al
    "8042": b"\xb0\xfe\xe6\x64",  # mov al,0xfe; out 0x64,al
    "port92": b"\xb0\x01\xe6\x92",  # mov al,1; out 0x92,al
}


@pytest.mark.parametrize(("kind", "code"), sorted(RESET_WRITES.items()))
def test_a_reset_write_ends_the_run_with_a_clear_reason(
    tmp_path: Path, run_image: Callable[..., RunResult], kind: str, code: bytes
) -> None:
    image = tmp_path / f"{kind}.bin"
    image.write_bytes(code + b"\xf4")
    r = run_image(image, load_addr=0x100000)
    assert r.reason == "reset" and r.process_status == 0, r
    assert {"cf9": "0xcf9", "8042": "0xfe", "port92": "0x92"}[kind] in r.detail


def test_acpi_s5_powers_off_with_status_0(
    tmp_path: Path, run_image: Callable[..., RunResult]
) -> None:
    image = tmp_path / "s5.bin"
    image.write_bytes(b"\x66\xb8\x01\x20\x66\xba\x04\x06\x66\xef\xf4")  # out 0x604, 0x2001 (S5)
    r = run_image(image, load_addr=0x100000)
    assert r.reason == "poweroff" and r.process_status == 0 and "S5" in r.detail


def test_an_image_over_the_acpi_tables_is_refused(
    tmp_path: Path, run_image: Callable[..., RunResult]
) -> None:
    image = tmp_path / "low.bin"
    image.write_bytes(b"\xf4" * 16)
    with pytest.raises(ImageError, match="0xf0000"):
        run_image(image, load_addr=0xF0100)
    image.write_bytes(b"\xb0\x00\xe6\xf4")  # mov al,0; out 0xf4,al: above the tables is fine
    r = run_image(image, load_addr=0xFF000)
    assert (r.reason, r.exit_code) == ("exit", 0)


def test_pc_testdev_guest(
    guest_image: Callable[[str], Path], run_image: Callable[..., RunResult]
) -> None:
    r = run_image(guest_image("testdev"), devices=("pc-testdev",))
    assert (r.reason, r.exit_code) == ("exit", 0), r.console
    assert r.console.count(": yes\n") == 3
    r = run_image(guest_image("testdev"))  # off by default: nothing answers there
    assert (r.reason, r.exit_code) == ("exit", 1) and ": no\n" in r.console
