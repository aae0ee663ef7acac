"""CPUID entries as plain values, convertible to and from ``struct kvm_cpuid_entry2``."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

#: ``kvm_cpuid_entry2.flags``: the leaf has sub-leaves selected by ECX.
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


@dataclass(frozen=True)
class CpuidEntry:
    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0

    @classmethod
    def from_c(cls, c: Any) -> CpuidEntry:
        return cls(c.function, c.index, c.flags, c.eax, c.ebx, c.ecx, c.edx)

    def to_c(self, c: Any) -> None:
        c.function, c.index, c.flags = self.function, self.index, self.flags
        c.eax, c.ebx, c.ecx, c.edx = self.eax, self.ebx, self.ecx, self.edx

    def with_regs(self, **regs: int) -> CpuidEntry:
        return replace(self, **regs)


def with_apic_id(entries: list[CpuidEntry], apic_id: int) -> list[CpuidEntry]:
    """The same CPUID with the initial APIC id set to ``apic_id`` (leaf 1 EBX[31:24],
    leaf 0xB/0x1F EDX) — each vCPU of an SMP guest needs its own."""
    out = []
    for e in entries:
        if e.function == 1:
            e = e.with_regs(ebx=(e.ebx & 0x00FFFFFF) | ((apic_id & 0xFF) << 24))
        elif e.function in (0xB, 0x1F):
            e = e.with_regs(edx=apic_id)
        out.append(e)
    return out
