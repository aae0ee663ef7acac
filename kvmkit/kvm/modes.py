"""Put a vCPU in real mode, 32-bit flat protected mode or 64-bit long mode, at CPL 0 or 3.

The caller provides the memory; these helpers write the system tables (GDT, TSS and, for
long mode, identity-mapped page tables) into it and load the matching segment state, as
a bootloader would.  The IDT is left empty (limit 0) on purpose: a guest that faults
without installing its own handlers ends in a triple fault, reported as ``Shutdown``.

Layout of the tables, from ``tables_at`` (page-aligned, :data:`TABLES_SIZE` bytes, in
guest memory)::

    +0x0000 PML4      +0x1000 PDPT      +0x2000..0x5fff four page directories (4 GiB)
    +0x6000 GDT       +0x7000 TSS with an I/O permission bitmap allowing every port
    +0xA000 IDT (256 not-present gates)

The I/O bitmap matters at CPL 3: VT-x and AMD-V honour RFLAGS.IOPL = 3, but PVM runs
user code with the hardware IOPL at 0 and emulates the faulting ``in``/``out`` — allowed
only when the TSS bitmap permits the port.  With both set, port I/O (and so every
hypercall) works from user mode on every backend.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any

from kvmkit.kvm.vcpu import Regs, Vcpu

TABLES_SIZE = 0xB000
DEFAULT_TABLES_AT = 0x20000

# GDT selectors (index * 8); user selectors are used with RPL 3.
SEL_CODE64 = 0x08
SEL_DATA = 0x10
SEL_CODE32 = 0x18
SEL_USER_DATA = 0x20
SEL_USER_CODE64 = 0x28
SEL_USER_CODE32 = 0x30
SEL_TSS = 0x38

_GDT = [
    0x0000000000000000,  # null
    0x00AF9A000000FFFF,  # 0x08 64-bit code, DPL 0
    0x00CF92000000FFFF,  # 0x10 data, DPL 0
    0x00CF9A000000FFFF,  # 0x18 32-bit code, DPL 0
    0x00CFF2000000FFFF,  # 0x20 data, DPL 3
    0x00AFFA000000FFFF,  # 0x28 64-bit code, DPL 3
    0x00CFFA000000FFFF,  # 0x30 32-bit code, DPL 3
]

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1
RFLAGS_IOPL3 = 3 << 12

_PTE_P, _PTE_RW, _PTE_US, _PTE_PS = 1, 2, 4, 0x80
_TSS_SIZE = 0x68
_IDT_OFFSET = 0xA000
_IDT_ENTRIES = 256
_IO_BITMAP_BYTES = 65536 // 8
#: TSS limit: the 104-byte TSS, the I/O bitmap, and the terminating 0xff byte.
_TSS_LIMIT = _TSS_SIZE + _IO_BITMAP_BYTES


class Mode(str, enum.Enum):
    """The CPU mode :func:`setup_mode` puts a vCPU in before its first run."""

    REAL = "real"
    PROTECTED = "protected"
    LONG = "long"


@dataclass(frozen=True)
class ModeSetup:
    """What :func:`setup_mode` did, for the caller's report."""

    mode: Mode
    cpl: int
    tables_at: int | None


def _tss_descriptor(base: int, limit: int, long_mode: bool) -> list[int]:
    low = (
        (limit & 0xFFFF)
        | ((base & 0xFFFFFF) << 16)
        | (0x8B << 40)  # present, busy TSS (type 11)
        | (((limit >> 16) & 0xF) << 48)
        | (((base >> 24) & 0xFF) << 56)
    )
    return [low, base >> 32] if long_mode else [low]


def write_system_tables(vcpu: Vcpu, tables_at: int, *, long_mode: bool, kernel_stack: int) -> None:
    """Write GDT, TSS and (for long mode) 4 GiB of identity page tables at ``tables_at``.

    The caller guarantees ``[tables_at, tables_at + TABLES_SIZE)`` is guest RAM that the
    guest does not use for anything else.  Pages are user-accessible so CPL 3 code runs.
    """
    vm = vcpu.vm
    gdt_at, tss_at = tables_at + 0x6000, tables_at + 0x7000
    gdt = _GDT + _tss_descriptor(tss_at, _TSS_LIMIT, long_mode)
    vm.write(gdt_at, struct.pack(f"<{len(gdt)}Q", *gdt))
    tss = bytearray(_TSS_LIMIT + 1)  # bitmap bytes stay zero: every port allowed
    tss[_TSS_LIMIT] = 0xFF
    if long_mode:
        struct.pack_into("<Q", tss, 4, kernel_stack)  # rsp0
    else:
        struct.pack_into("<IH", tss, 4, kernel_stack & 0xFFFFFFFF, SEL_DATA)  # esp0, ss0
    struct.pack_into("<H", tss, 0x66, _TSS_SIZE)  # I/O bitmap right after the TSS
    vm.write(tss_at, bytes(tss))
    vm.write(tables_at + _IDT_OFFSET, bytes(_IDT_ENTRIES * 16))
    if long_mode:
        pml4, pdpt = tables_at, tables_at + 0x1000
        flags = _PTE_P | _PTE_RW | _PTE_US
        vm.write(pml4, struct.pack("<Q", pdpt | flags) + bytes(4088))
        pds = [tables_at + 0x2000 + i * 0x1000 for i in range(4)]
        vm.write(pdpt, struct.pack("<4Q", *(pd | flags for pd in pds)) + bytes(4096 - 32))
        for gib, pd in enumerate(pds):
            base = gib << 30
            entries = [(base + (i << 21)) | flags | _PTE_PS for i in range(512)]
            vm.write(pd, struct.pack("<512Q", *entries))


def _segment(
    seg: Any,
    *,
    selector: int,
    base: int = 0,
    limit: int = 0xFFFFFFFF,
    type_: int,
    dpl: int,
    db: int,
    l_: int,
    s: int = 1,
    g: int = 1,
) -> None:
    seg.selector = selector
    seg.base = base
    seg.limit = limit
    seg.type = type_
    seg.present = 1
    seg.dpl = dpl
    seg.db = db
    seg.l = l_
    seg.s = s
    seg.g = g
    seg.avl = 0
    seg.unusable = 0


def real_mode_segments(entry: int, stack: int) -> tuple[int, int, int, int]:
    """``(cs, ip, ss, sp)`` for linear ``entry`` and stack top ``stack``, both at most 1 MiB.

    Below 64 KiB the code segment is 0 (CS:IP = 0:entry, as a boot sector runs);
    above, CS = entry >> 4 and IP = 0, so ``entry`` must be a multiple of 16.  The stack
    segment is the 64 KiB-aligned one holding the byte below ``stack`` (SP = 0 means the
    top of that segment: the first push goes to SS:0xFFFE).
    """
    if not 0 <= entry < 0x100000 or not 0 <= stack <= 0x100000:
        raise ValueError(f"real-mode entry {entry:#x} and stack {stack:#x} must lie below 1 MiB")
    if entry <= 0xFFFF:
        cs, ip = 0, entry
    elif entry % 16:
        raise ValueError(f"real-mode entry {entry:#x} above 64 KiB must be a multiple of 16")
    else:
        cs, ip = entry >> 4, 0
    ss = ((stack - 1) >> 16) << 12 if stack else 0
    sp = (stack - (ss << 4)) & 0xFFFF
    return cs, ip, ss, sp


def setup_real_mode(vcpu: Vcpu, *, entry: int, stack: int = 0) -> ModeSetup:
    """Real mode at linear ``entry`` with the stack top at linear ``stack`` (both below
    1 MiB; segments from :func:`real_mode_segments`, DS = ES = FS = GS = CS)."""
    cs, ip, ss, sp = real_mode_segments(entry, stack)
    sregs = vcpu.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        selector = ss if name == "ss" else cs
        _segment(
            getattr(sregs, name),
            selector=selector,
            base=selector << 4,
            limit=0xFFFF,
            type_=0xB if name == "cs" else 0x3,
            dpl=0,
            db=0,
            l_=0,
            g=0,
        )
    sregs.cr0 = (sregs.cr0 | CR0_ET) & ~(CR0_PE | CR0_PG)
    sregs.efer = 0
    vcpu.set_sregs(sregs)
    vcpu.set_regs(Regs(rip=ip, rsp=sp, rflags=RFLAGS_RESERVED))
    return ModeSetup(Mode.REAL, 0, None)


def _enter_flat(
    vcpu: Vcpu,
    *,
    entry: int,
    stack: int,
    cpl: int,
    tables_at: int,
    kernel_stack: int | None,
    long_mode: bool,
) -> None:
    """Shared by protected and long mode: tables, flat segments at ``cpl``, registers.
    The caller then sets the control registers and EFER for its mode."""
    _check_cpl(cpl)
    if long_mode:  # KVM only accepts EFER.LME when the guest's CPUID has long mode
        vcpu.set_cpuid2(vcpu.vm.kvm.supported_cpuid())
    write_system_tables(vcpu, tables_at, long_mode=long_mode, kernel_stack=kernel_stack or stack)
    sregs = vcpu.get_sregs()
    user = cpl == 3
    if user:
        code_sel, data_sel = (
            (SEL_USER_CODE64 if long_mode else SEL_USER_CODE32) | 3,
            SEL_USER_DATA | 3,
        )
    else:
        code_sel, data_sel = SEL_CODE64 if long_mode else SEL_CODE32, SEL_DATA
    _segment(
        sregs.cs,
        selector=code_sel,
        type_=0xB,
        dpl=cpl,
        db=0 if long_mode else 1,
        l_=1 if long_mode else 0,
    )
    for name in ("ds", "es", "fs", "gs", "ss"):
        _segment(getattr(sregs, name), selector=data_sel, type_=0x3, dpl=cpl, db=1, l_=0)
    _load_tables(sregs, tables_at, long_mode=long_mode)
    if long_mode:
        sregs.cr3 = tables_at
        sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
        sregs.efer = EFER_LME | EFER_LMA | EFER_SCE
    else:
        sregs.cr0 = CR0_PE | CR0_ET | CR0_NE
        sregs.cr4 = 0
        sregs.efer = 0
    vcpu.set_sregs(sregs)
    vcpu.set_regs(
        Regs(rip=entry, rsp=stack, rflags=RFLAGS_RESERVED | (RFLAGS_IOPL3 if user else 0))
    )


def setup_protected_mode(
    vcpu: Vcpu,
    *,
    entry: int,
    stack: int,
    cpl: int = 0,
    tables_at: int = DEFAULT_TABLES_AT,
    kernel_stack: int | None = None,
) -> ModeSetup:
    """32-bit flat protected mode, paging off, at CPL ``cpl`` (0 or 3; at 3 with IOPL 3
    so port I/O still works).  Tables are written at ``tables_at`` (see module doc)."""
    _enter_flat(
        vcpu,
        entry=entry,
        stack=stack,
        cpl=cpl,
        tables_at=tables_at,
        kernel_stack=kernel_stack,
        long_mode=False,
    )
    return ModeSetup(Mode.PROTECTED, cpl, tables_at)


def setup_long_mode(
    vcpu: Vcpu,
    *,
    entry: int,
    stack: int,
    cpl: int = 0,
    tables_at: int = DEFAULT_TABLES_AT,
    kernel_stack: int | None = None,
) -> ModeSetup:
    """64-bit long mode with 4 GiB identity-mapped by 2 MiB pages, at CPL ``cpl`` (0 or 3;
    at 3 with IOPL 3).  Sets CPUID from ``supported_cpuid()`` first."""
    _enter_flat(
        vcpu,
        entry=entry,
        stack=stack,
        cpl=cpl,
        tables_at=tables_at,
        kernel_stack=kernel_stack,
        long_mode=True,
    )
    return ModeSetup(Mode.LONG, cpl, tables_at)


def _load_tables(sregs: Any, tables_at: int, *, long_mode: bool) -> None:
    gdt_entries = len(_GDT) + (2 if long_mode else 1)
    sregs.gdt.base = tables_at + 0x6000
    sregs.gdt.limit = gdt_entries * 8 - 1
    sregs.idt.base = tables_at + _IDT_OFFSET
    sregs.idt.limit = _IDT_ENTRIES * (16 if long_mode else 8) - 1
    _segment(
        sregs.tr,
        selector=SEL_TSS,
        base=tables_at + 0x7000,
        limit=_TSS_LIMIT,
        type_=0xB,
        dpl=0,
        db=0,
        l_=0,
        s=0,
        g=0,
    )
    _segment(sregs.ldt, selector=0, base=0, limit=0xFFFF, type_=0x2, dpl=0, db=0, l_=0, s=0, g=0)
    sregs.ldt.unusable = 1
    sregs.ldt.present = 0


def _check_cpl(cpl: int) -> None:
    if cpl not in (0, 3):
        raise ValueError(f"cpl must be 0 or 3, not {cpl}")


def setup_mode(
    vcpu: Vcpu,
    mode: Mode | str,
    *,
    entry: int,
    stack: int,
    cpl: int = 0,
    tables_at: int = DEFAULT_TABLES_AT,
) -> ModeSetup:
    """Dispatch to the ``setup_*_mode`` helper for ``mode``."""
    mode = Mode(mode)
    if mode is Mode.REAL:
        if cpl != 0:
            raise ValueError("real mode has no CPL 3")
        return setup_real_mode(vcpu, entry=entry, stack=stack)
    if mode is Mode.PROTECTED:
        return setup_protected_mode(vcpu, entry=entry, stack=stack, cpl=cpl, tables_at=tables_at)
    return setup_long_mode(vcpu, entry=entry, stack=stack, cpl=cpl, tables_at=tables_at)
