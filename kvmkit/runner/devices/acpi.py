r"""ACPI tables for the runner's PC, built as bytes and written into guest memory.

What :func:`build_acpi_tables` lays out from :data:`ACPI_BASE` (0xF0000, inside the
0xE0000-0xFFFFF area where the specification says a kernel searches for the RSDP and which
the runner's e820 map reserves), each table 16-byte aligned (the FACS 64-byte aligned):

- RSDP revision 2 (ACPI 2.0+): points at the RSDT and at the XSDT;
- RSDT (32-bit pointers) and XSDT (64-bit pointers): the FADT and the MADT;
- FADT revision 3, with both the 32-bit block addresses and the X_ generic addresses: PM1a
  event block 0x600, PM1a control block 0x604, PM timer 0x608 (24-bit), SCI on IRQ 9, no
  SMI command port (always in ACPI mode), the RTC century at CMOS 0x32, legacy devices and
  an 8042 present, the reset register at port 0xcf9 with value 6 (as QEMU's q35);
- FACS (64 bytes) and a DSDT whose only object is ``\\_S5`` (soft off with SLP_TYP 0);
- MADT: the local APIC at 0xfee00000 with PCAT_COMPAT, one enabled Processor Local APIC
  per vCPU (ACPI ids and APIC ids 0..n-1), the IOAPIC (id 0) at 0xfec00000 with GSI base
  0, the interrupt source overrides of QEMU's ``pc`` (IRQ 0 -> GSI 2; IRQs 5, 9, 10 and 11
  level-triggered active-high), and a LAPIC NMI on LINT1 of every processor.

The checksums are valid and nothing describes a device the VM does not have.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from kvmkit.runner.devices.pmtimer import (
    PM1_CNT_LEN,
    PM1_CNT_PORT,
    PM1_EVT_LEN,
    PM1_EVT_PORT,
    PM_TMR_LEN,
    PM_TMR_PORT,
)
from kvmkit.runner.errors import RunnerError

ACPI_BASE = 0xF0000
#: The tables must end below the BIOS area's end (where the image is loaded).
ACPI_LIMIT = 0x100000
RSDP_SEARCH = (0xE0000, 0x100000)
LAPIC_ADDR = 0xFEE00000
IOAPIC_ADDR = 0xFEC00000
IOAPIC_ID = 0
SCI_IRQ = 9
RESET_PORT = 0xCF9
RESET_VALUE = 0x06
RTC_CENTURY_REG = 0x32
#: ISA IRQs QEMU's pc routes PCI interrupts to; their overrides say level, active-high.
PCI_IRQS = (5, 9, 10, 11)
OEM_ID = b"KVMKIT"
OEM_TABLE_ID = b"KVMKITPC"
CREATOR_ID = b"KVMK"
#: The most vCPUs an xAPIC MADT entry (8-bit APIC id, 0xff = broadcast) can describe.
MAX_XAPIC_VCPUS = 255

_GAS_SYSTEM_IO = 1


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` sum to 0 modulo 256 (when put in place of a 0)."""
    return (-sum(data)) & 0xFF


def _sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: the 36-byte header, ``body``, a valid checksum."""
    length = 36 + len(body)
    header = struct.pack(
        "<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1, CREATOR_ID, 1
    )
    table = bytearray(header + body)
    table[9] = checksum(bytes(table))
    return bytes(table)


def _gas(port: int, length: int, access: int = 0) -> bytes:
    """A Generic Address Structure for an I/O port block of ``length`` bytes (0: none)."""
    if not port:
        return bytes(12)
    return struct.pack("<BBBBQ", _GAS_SYSTEM_IO, 8 * length, 0, access, port)


def build_dsdt() -> bytes:
    r"""The DSDT: ``Name(\\_S5, Package(4){0, 0, 0, 0})`` and nothing else."""
    s5 = b"\x08_S5_" + bytes([0x12, 0x06, 0x04, 0x00, 0x00, 0x00, 0x00])
    return _sdt(b"DSDT", 2, s5)


def build_facs() -> bytes:
    """A 64-byte FACS (no checksum in this table, by the specification)."""
    return struct.pack("<4sIIIIIQB3sI24s", b"FACS", 64, 0, 0, 0, 0, 0, 2, bytes(3), 0, bytes(24))


def build_fadt(*, facs: int, dsdt: int) -> bytes:
    """FADT revision 3 (244 bytes) for the PM blocks of :mod:`pmtimer`."""
    body = bytearray(244 - 36)

    def put(offset: int, fmt: str, *values: object) -> None:
        struct.pack_into("<" + fmt, body, offset - 36, *values)

    put(36, "II", facs, dsdt)
    put(45, "B", 0)  # preferred PM profile: unspecified
    put(46, "H", SCI_IRQ)
    put(48, "IBBBB", 0, 0, 0, 0, 0)  # no SMI command port: always in ACPI mode
    put(56, "IIIIIIII", PM1_EVT_PORT, 0, PM1_CNT_PORT, 0, 0, PM_TMR_PORT, 0, 0)
    put(88, "BBBBBBBB", PM1_EVT_LEN, PM1_CNT_LEN, 0, PM_TMR_LEN, 0, 0, 0, 0)
    put(96, "HH", 0xFFF, 0xFFFF)  # C2 and C3 not supported
    put(106, "BBB", 0, 0, RTC_CENTURY_REG)
    put(109, "H", 0x0003)  # IAPC_BOOT_ARCH: legacy devices, 8042
    flags = (
        (1 << 0)  # WBINVD works
        | (1 << 2)  # C1 supported
        | (1 << 4)  # power button: not a fixed feature
        | (1 << 5)  # sleep button: not a fixed feature
        | (1 << 10)  # RESET_REG supported
    )  # TMR_VAL_EXT (bit 8) clear: the PM timer is 24 bits
    put(112, "I", flags)
    body[116 - 36 : 128 - 36] = _gas(RESET_PORT, 1, 1)
    put(128, "B", RESET_VALUE)
    put(132, "QQ", facs, dsdt)
    body[148 - 36 : 160 - 36] = _gas(PM1_EVT_PORT, PM1_EVT_LEN, 2)
    body[172 - 36 : 184 - 36] = _gas(PM1_CNT_PORT, PM1_CNT_LEN, 2)
    body[208 - 36 : 220 - 36] = _gas(PM_TMR_PORT, PM_TMR_LEN, 3)
    return _sdt(b"FACP", 3, bytes(body))


def build_madt(vcpus: int) -> bytes:
    """MADT: one LAPIC per vCPU, the IOAPIC, the pc machine's overrides, LINT1 as NMI."""
    body = bytearray(struct.pack("<II", LAPIC_ADDR, 1))  # PCAT_COMPAT: there are 8259s
    for i in range(vcpus):
        body += struct.pack("<BBBBI", 0, 8, i, i, 1)  # processor i, APIC id i, enabled
    body += struct.pack("<BBBBII", 1, 12, IOAPIC_ID, 0, IOAPIC_ADDR, 0)
    body += struct.pack("<BBBBIH", 2, 10, 0, 0, 2, 0)  # ISA IRQ 0 -> GSI 2, bus defaults
    for irq in PCI_IRQS:
        body += struct.pack("<BBBBIH", 2, 10, 0, irq, irq, 0x000D)  # active high, level
    body += struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1)  # NMI on LINT1 of every processor
    return _sdt(b"APIC", 3, bytes(body))


def build_rsdp(*, rsdt: int, xsdt: int) -> bytes:
    """RSDP revision 2: the 20-byte ACPI 1.0 part and the extended checksum."""
    rsdp = bytearray(
        struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, rsdt, 36, xsdt, 0, b"")
    )
    rsdp[8] = checksum(bytes(rsdp[:20]))
    rsdp[32] = checksum(bytes(rsdp))
    return bytes(rsdp)


@dataclass
class AcpiTables:
    """The tables and where they go: ``blob`` is written at ``base``; ``addresses`` maps
    each signature (``RSDP``, ``RSDT``, ``XSDT``, ``FACP``, ``FACS``, ``DSDT``, ``APIC``)
    to its guest-physical address."""

    base: int
    blob: bytes
    addresses: dict[str, int] = field(default_factory=dict)

    @property
    def rsdp(self) -> int:
        return self.addresses["RSDP"]

    @property
    def end(self) -> int:
        return self.base + len(self.blob)


def _align(value: int, to: int) -> int:
    return (value + to - 1) & ~(to - 1)


def build_acpi_tables(
    *, vcpus: int, mem_size: int, base: int = ACPI_BASE, limit: int = ACPI_LIMIT
) -> AcpiTables:
    """Every table for a VM of ``vcpus`` vCPUs and ``mem_size`` bytes of RAM, placed from
    ``base`` (16-byte aligned, inside 0xE0000-0xFFFFF so the RSDP is found).

    Raises :class:`RunnerError` when the vCPU count has no xAPIC MADT form, when ``base``
    is not a place a kernel searches for the RSDP, when RAM does not reach ``limit``, or
    when the tables would not end below ``limit``.
    """
    if not 1 <= vcpus <= MAX_XAPIC_VCPUS:
        raise RunnerError(f"ACPI: {vcpus} vCPUs: the MADT describes 1 to {MAX_XAPIC_VCPUS} xAPICs")
    if base % 16 or not RSDP_SEARCH[0] <= base < RSDP_SEARCH[1]:
        raise RunnerError(
            f"ACPI: tables at {base:#x}: the RSDP must be 16-byte aligned in "
            f"{RSDP_SEARCH[0]:#x}-{RSDP_SEARCH[1] - 1:#x}"
        )
    if mem_size < limit:
        raise RunnerError(
            f"ACPI: {mem_size} bytes of RAM do not reach {limit:#x}, where the tables go"
        )
    addresses: dict[str, int] = {}
    parts: list[tuple[int, bytes]] = []
    cursor = base

    def place(sig: str, data: bytes, align: int = 16) -> int:
        nonlocal cursor
        cursor = _align(cursor, align)
        addresses[sig] = cursor
        parts.append((cursor, data))
        cursor += len(data)
        return addresses[sig]

    # RSDP first (its pointers are filled in once the rest is placed; it is fixed-size).
    place("RSDP", bytes(36))
    facs = place("FACS", build_facs(), 64)
    dsdt = place("DSDT", build_dsdt())
    fadt = place("FACP", build_fadt(facs=facs, dsdt=dsdt))
    madt = place("APIC", build_madt(vcpus))
    rsdt = place("RSDT", _sdt(b"RSDT", 1, struct.pack("<II", fadt, madt)))
    xsdt = place("XSDT", _sdt(b"XSDT", 1, struct.pack("<QQ", fadt, madt)))
    parts[0] = (addresses["RSDP"], build_rsdp(rsdt=rsdt, xsdt=xsdt))
    if cursor > limit:
        raise RunnerError(
            f"ACPI: the tables for {vcpus} vCPUs need {cursor - base} bytes from {base:#x}, "
            f"past {limit:#x}",
            hint="give fewer vCPUs, or place the tables lower",
        )
    blob = bytearray(cursor - base)
    for addr, data in parts:
        blob[addr - base : addr - base + len(data)] = data
    return AcpiTables(base=base, blob=bytes(blob), addresses=addresses)


def acpi_tables_span(vcpus: int) -> tuple[int, int]:
    """The half-open guest-physical range the tables for ``vcpus`` vCPUs occupy (what a
    loader must keep free); raises as :func:`build_acpi_tables` does."""
    tables = build_acpi_tables(vcpus=vcpus, mem_size=ACPI_LIMIT)
    return tables.base, tables.end
