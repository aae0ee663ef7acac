"""ACPI tables: layout, checksums, what the FADT and MADT say, limits, and a check by
ACPICA's own disassembler (iasl) that the tables are well-formed."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from kvmkit.runner.devices.acpi import (
    ACPI_BASE,
    IOAPIC_ADDR,
    LAPIC_ADDR,
    MAX_XAPIC_VCPUS,
    build_acpi_tables,
)
from kvmkit.runner.errors import RunnerError

MiB = 1 << 20


def table(blob: bytes, base: int, addr: int) -> bytes:
    off = addr - base
    length = struct.unpack_from("<I", blob, off + 4)[0]
    return blob[off : off + length]


def test_rsdp_is_found_where_a_kernel_searches_and_both_checksums_hold() -> None:
    t = build_acpi_tables(vcpus=2, mem_size=64 * MiB)
    assert t.rsdp % 16 == 0 and 0xE0000 <= t.rsdp < 0x100000 and t.end <= 0x100000
    rsdp = t.blob[t.rsdp - t.base : t.rsdp - t.base + 36]
    assert rsdp[:8] == b"RSD PTR " and rsdp[15] == 2
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    rsdt, length, xsdt = struct.unpack_from("<IIQ", rsdp, 16)
    assert (rsdt, length, xsdt) == (t.addresses["RSDT"], 36, t.addresses["XSDT"])


@pytest.mark.parametrize("vcpus", [1, 4, MAX_XAPIC_VCPUS])
def test_every_table_checksums_and_the_roots_list_fadt_and_madt(vcpus: int) -> None:
    t = build_acpi_tables(vcpus=vcpus, mem_size=64 * MiB)
    for sig in ("RSDT", "XSDT", "FACP", "DSDT", "APIC"):
        data = table(t.blob, t.base, t.addresses[sig])
        assert data[:4] == sig.encode() and sum(data) % 256 == 0, sig
    rsdt = table(t.blob, t.base, t.addresses["RSDT"])
    xsdt = table(t.blob, t.base, t.addresses["XSDT"])
    want = [t.addresses["FACP"], t.addresses["APIC"]]
    assert list(struct.unpack_from("<II", rsdt, 36)) == want
    assert list(struct.unpack_from("<QQ", xsdt, 36)) == want
    facs = t.addresses["FACS"]
    assert facs % 64 == 0 and t.blob[facs - t.base : facs - t.base + 4] == b"FACS"


def test_fadt_points_at_the_pm_blocks_sci_and_reset_register() -> None:
    t = build_acpi_tables(vcpus=1, mem_size=64 * MiB)
    f = table(t.blob, t.base, t.addresses["FACP"])
    assert len(f) == 244 and f[8] == 3
    facs, dsdt = struct.unpack_from("<II", f, 36)
    assert (facs, dsdt) == (t.addresses["FACS"], t.addresses["DSDT"])
    assert struct.unpack_from("<H", f, 46)[0] == 9  # SCI_INT
    assert struct.unpack_from("<I", f, 48)[0] == 0  # no SMI_CMD: ACPI mode only
    assert struct.unpack_from("<IIII", f, 56) == (0x600, 0, 0x604, 0)
    assert struct.unpack_from("<I", f, 76)[0] == 0x608
    assert (f[88], f[89], f[91]) == (4, 2, 4)
    assert f[108] == 0x32  # RTC century register
    flags = struct.unpack_from("<I", f, 112)[0]
    assert flags & (1 << 10) and not flags & (1 << 8)  # reset register; 24-bit timer
    assert struct.unpack_from("<BBBBQ", f, 116) == (1, 8, 0, 1, 0xCF9) and f[128] == 6
    assert struct.unpack_from("<QQ", f, 132) == (facs, dsdt)
    assert struct.unpack_from("<BBBBQ", f, 208) == (1, 32, 0, 3, 0x608)


def test_madt_has_a_lapic_per_vcpu_the_ioapic_and_qemus_overrides() -> None:
    t = build_acpi_tables(vcpus=3, mem_size=64 * MiB)
    m = table(t.blob, t.base, t.addresses["APIC"])
    assert struct.unpack_from("<II", m, 36) == (LAPIC_ADDR, 1)
    entries = []
    off = 44
    while off < len(m):
        kind, length = m[off], m[off + 1]
        entries.append((kind, m[off : off + length]))
        off += length
    assert off == len(m)
    lapics = [struct.unpack_from("<BBI", e, 2) for k, e in entries if k == 0]
    assert lapics == [(0, 0, 1), (1, 1, 1), (2, 2, 1)]
    ioapics = [struct.unpack_from("<BBII", e, 2) for k, e in entries if k == 1]
    assert ioapics == [(0, 0, IOAPIC_ADDR, 0)]
    isos = [struct.unpack_from("<BBIH", e, 2) for k, e in entries if k == 2]
    assert isos == [
        (0, 0, 2, 0),
        (0, 5, 5, 0xD),
        (0, 9, 9, 0xD),
        (0, 10, 10, 0xD),
        (0, 11, 11, 0xD),
    ]
    assert [k for k, _ in entries].count(4) == 1


@pytest.mark.parametrize("vcpus", [0, MAX_XAPIC_VCPUS + 1])
def test_vcpu_counts_without_an_xapic_madt_are_refused(vcpus: int) -> None:
    with pytest.raises(RunnerError, match="MADT"):
        build_acpi_tables(vcpus=vcpus, mem_size=64 * MiB)


def test_tables_that_would_not_fit_below_the_bios_area_end_are_refused() -> None:
    with pytest.raises(RunnerError, match="past 0x100000"):
        build_acpi_tables(vcpus=MAX_XAPIC_VCPUS, mem_size=64 * MiB, base=0xFFC00)
    with pytest.raises(RunnerError, match="16-byte aligned"):
        build_acpi_tables(vcpus=1, mem_size=64 * MiB, base=0x9000)
    assert build_acpi_tables(vcpus=1, mem_size=64 * MiB).base == ACPI_BASE


def test_acpica_disassembles_every_table_without_complaint(tmp_path: Path) -> None:
    iasl = shutil.which("iasl")
    if iasl is None:
        pytest.fail("iasl not found: scripts/ensure-sysdeps.sh installs acpica-tools")
    t = build_acpi_tables(vcpus=4, mem_size=64 * MiB)
    for sig in ("FACP", "DSDT", "APIC", "RSDT", "XSDT"):
        path = tmp_path / f"{sig.lower()}.dat"
        path.write_bytes(table(t.blob, t.base, t.addresses[sig]))
        proc = subprocess.run([iasl, "-d", str(path)], capture_output=True, text=True, timeout=60)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        dsl = path.with_suffix(".dsl").read_text()
        assert "Invalid" not in dsl and "Incorrect" not in dsl and "Error" not in dsl, dsl
    madt = (tmp_path / "apic.dsl").read_text()
    assert madt.count("Processor Local APIC") == 4
    fadt = (tmp_path / "facp.dsl").read_text()
    assert "PM Timer Block Address : 00000608" in fadt
