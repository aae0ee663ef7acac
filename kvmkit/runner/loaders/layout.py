"""Guest-physical layout of QEMU's ``pc`` machine: where RAM goes, the e820 map a
multiboot kernel gets, and free places for what the runner itself puts in guest RAM.

RAM is split as ``pc_init1`` (QEMU 7.2, ``hw/i386/pc_piix.c``) splits it: below 3.5 GiB
all of it sits at 0; from 3.5 GiB on, the first 3 GiB sit at 0 and the rest at 4 GiB,
leaving the PCI hole (LAPIC, IOAPIC, MMIO devices) in between.  The e820 map is what
SeaBIOS hands QEMU's multiboot option ROM on that machine under KVM, measured here with
QEMU 7.2 for 64 MiB, 1, 3.25, 3.5 and 6 GiB: conventional memory up to the EBDA, the
BIOS area, RAM from 1 MiB up to 128 KiB below the low top (SeaBIOS keeps those for its
tables), the KVM identity-map/TSS pages, the BIOS ROM, RAM above 4 GiB, and on an AMD
CPU with 40 or more physical address bits the HyperTransport hole below 1 TiB.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE = 0x1000

#: ``max-ram-below-4g`` default, and the gigabyte-aligned split used from there on.
LOWMEM_DEFAULT = 0xE0000000
LOWMEM_GIGABYTE_ALIGNED = 0xC0000000
HIGH_RAM_BASE = 4 * GiB

E820_RAM = 1
E820_RESERVED = 2

EBDA_START = 0x9FC00
BIOS_AREA = (0xF0000, 0x10000)
#: SeaBIOS reserves the top 128 KiB of RAM below 4 GiB for its own tables.
BIOS_HIGH_TABLES = 0x20000
#: QEMU's KVM identity-map page and the three TSS pages VMX needs for real mode.
KVM_IDENTITY_MAP_ADDR = 0xFEFFC000
KVM_TSS_ADDR = 0xFEFFD000
KVM_RESERVED = (KVM_IDENTITY_MAP_ADDR, 0x4000)
BIOS_ROM = (0xFFFC0000, 0x40000)
AMD_HT_HOLE = (0xFD00000000, 0x300000000)

#: A multiboot kernel's lower memory: 639 KiB (int 0x12 under SeaBIOS: up to the EBDA).
MEM_LOWER_KIB = EBDA_START // KiB


@dataclass(frozen=True)
class RamLayout:
    """How much RAM sits below 4 GiB (at 0) and above it (at :data:`HIGH_RAM_BASE`)."""

    below_4g: int
    above_4g: int

    @property
    def regions(self) -> list[tuple[int, int]]:
        """``(guest_phys, size)`` of each RAM region."""
        out = [(0, self.below_4g)]
        if self.above_4g:
            out.append((HIGH_RAM_BASE, self.above_4g))
        return out


def pc_ram_layout(ram_size: int) -> RamLayout:
    """The split QEMU's ``pc`` machine (i440FX, 7.2, gigabyte-aligned) makes of ``ram_size``."""
    lowmem = LOWMEM_DEFAULT
    if ram_size >= lowmem:
        lowmem = LOWMEM_GIGABYTE_ALIGNED
    if ram_size >= lowmem:
        return RamLayout(lowmem, ram_size - lowmem)
    return RamLayout(ram_size, 0)


def e820_map(
    ram_size: int, *, kvm: bool = True, amd_ht_hole: bool = False
) -> list[tuple[int, int, int]]:
    """``(base, length, type)`` entries, in address order, of a ``pc`` guest with
    ``ram_size`` bytes (at least 2 MiB).  ``kvm`` adds QEMU's KVM identity-map/TSS entry,
    ``amd_ht_hole`` the AMD HyperTransport range (QEMU: AMD vendor, phys-bits >= 40)."""
    layout = pc_ram_layout(ram_size)
    top = layout.below_4g
    entries = [
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0xA0000 - EBDA_START, E820_RESERVED),
        (*BIOS_AREA, E820_RESERVED),
        (MiB, top - BIOS_HIGH_TABLES - MiB, E820_RAM),
        (top - BIOS_HIGH_TABLES, BIOS_HIGH_TABLES, E820_RESERVED),
        (*BIOS_ROM, E820_RESERVED),
    ]
    if kvm:
        entries.append((*KVM_RESERVED, E820_RESERVED))
    if layout.above_4g:
        entries.append((HIGH_RAM_BASE, layout.above_4g, E820_RAM))
    if amd_ht_hole:
        entries.append((*AMD_HT_HOLE, E820_RESERVED))
    return sorted(entries)


def amd_ht_hole(cpuid: Iterable[Any]) -> bool:
    """QEMU's rule for the HyperTransport e820 entry: an AMD vCPU with 40 or more
    physical address bits.  ``cpuid``: entries with function/ebx/ecx/edx/eax fields."""
    entries = list(cpuid)
    vendor = next((e for e in entries if e.function == 0), None)
    sizes = next((e for e in entries if e.function == 0x80000008), None)
    if vendor is None or sizes is None:
        return False
    name = b"".join(r.to_bytes(4, "little") for r in (vendor.ebx, vendor.edx, vendor.ecx))
    return name == b"AuthenticAMD" and sizes.eax & 0xFF >= 40


def mem_upper_kib(entries: Sequence[tuple[int, int, int]]) -> int:
    """KiB of RAM contiguous from 1 MiB, as QEMU's multiboot option ROM computes
    ``mem_upper`` from the e820 map (RAM entries below 4 GiB that extend the run)."""
    end = MiB
    grew = True
    while grew:
        grew = False
        for base, length, kind in entries:
            if kind == E820_RAM and base < HIGH_RAM_BASE and base <= end < base + length:
                end, grew = base + length, True
    return (end - MiB) // KiB


def _align_up(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def find_free(
    size: int,
    *,
    avoid: Iterable[tuple[int, int]],
    low: int,
    high: int,
    prefer: int | None = None,
    align: int = PAGE,
) -> int | None:
    """The lowest ``align``-aligned address ``a`` in ``[low, high - size]`` such that
    ``[a, a + size)`` meets none of the half-open ranges in ``avoid``; ``prefer`` first
    when it qualifies.  ``None`` when there is no such place."""
    busy = sorted((s, e) for s, e in avoid if e > s)

    def free(at: int) -> bool:
        return low <= at and at + size <= high and all(e <= at or at + size <= s for s, e in busy)

    if prefer is not None and prefer % align == 0 and free(prefer):
        return prefer
    candidates = [_align_up(low, align)] + [_align_up(e, align) for _s, e in busy]
    return min((c for c in candidates if free(c)), default=None)
