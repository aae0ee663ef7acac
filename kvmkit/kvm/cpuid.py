"""CPUID entries as plain values, convertible to and from ``struct kvm_cpuid_entry2``, and
the table of feature names (QEMU's) to their bits.  No policy: :mod:`kvmkit.runner.cpu`
decides what a guest gets."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

#: ``kvm_cpuid_entry2.flags``: the leaf has sub-leaves selected by ECX.
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


@dataclass(frozen=True)
class CpuidEntry:
    """One ``struct kvm_cpuid_entry2``: the registers CPUID returns for (function, index)."""

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


@dataclass(frozen=True)
class FeatureBit:
    """Where a named CPU feature lives: CPUID leaf ``function``, sub-leaf ``index``,
    register (``"eax"``..``"edx"``) and bit."""

    function: int
    index: int
    register: str
    bit: int

    def describe(self) -> str:
        sub = f",ECX={self.index}" if self.index else ""
        return f"CPUID.(EAX={self.function:#x}{sub}):{self.register.upper()}[{self.bit}]"


def _word(function: int, index: int, register: str, names: str) -> dict[str, FeatureBit]:
    """Bits 0..31 of one register, named as QEMU's ``feature_word_info`` names them
    (``.`` for a bit QEMU does not name)."""
    return {
        name: FeatureBit(function, index, register, bit)
        for bit, name in enumerate(names.split())
        if name != "."
    }


#: QEMU's feature names (``target/i386/cpu.c``, ``feature_word_info``) for the common words.
FEATURES: dict[str, FeatureBit] = {
    **_word(1, 0, "edx", "fpu vme de pse tsc msr pae mce cx8 apic . sep mtrr pge mca cmov "
            "pat pse36 pn clflush . ds acpi mmx fxsr sse sse2 ss ht tm ia64 pbe"),
    **_word(1, 0, "ecx", "pni pclmulqdq dtes64 monitor ds-cpl vmx smx est tm2 ssse3 cid . fma "
            "cx16 xtpr pdcm . pcid dca sse4.1 sse4.2 x2apic movbe popcnt tsc-deadline aes "
            "xsave . avx f16c rdrand hypervisor"),
    **_word(6, 0, "eax", ". . arat"),
    **_word(7, 0, "ebx", "fsgsbase tsc-adjust sgx bmi1 hle avx2 . smep bmi2 erms invpcid rtm "
            ". . mpx . avx512f avx512dq rdseed adx smap avx512ifma pcommit clflushopt clwb "
            "intel-pt avx512pf avx512er avx512cd sha-ni avx512bw avx512vl"),
    **_word(7, 0, "ecx", ". avx512vbmi umip pku . waitpkg avx512vbmi2 . gfni vaes vpclmulqdq "
            "avx512vnni avx512bitalg . avx512-vpopcntdq . la57 . . . . . rdpid . "
            "bus-lock-detect cldemote . movdiri movdir64b . sgxlc pks"),
    **_word(7, 0, "edx", ". . avx512-4vnniw avx512-4fmaps fsrm . . . avx512-vp2intersect . "
            "md-clear . . . serialize . tsx-ldtrk . . arch-lbr . . amx-bf16 avx512-fp16 "
            "amx-tile amx-int8 spec-ctrl stibp . arch-capabilities core-capability ssbd"),
    **_word(7, 1, "eax", ". . . . avx-vnni avx512-bf16 . . . . fzrm fsrs fsrc"),
    **_word(0xD, 1, "eax", "xsaveopt xsavec xgetbv1 xsaves xfd"),
    **_word(0x80000001, 0, "edx", ". . . . . . . . . . . syscall . . . . . . . . nx . "
            "mmxext . . fxsr-opt pdpe1gb rdtscp . lm 3dnowext 3dnow"),
    **_word(0x80000001, 0, "ecx", "lahf-lm cmp-legacy svm extapic cr8legacy abm sse4a "
            "misalignsse 3dnowprefetch osvw ibs xop skinit wdt . lwp fma4 tce . nodeid-msr . "
            "tbm topoext perfctr-core perfctr-nb"),
    **_word(0x80000007, 0, "edx", ". . . . . . . . invtsc"),
    **_word(0x80000008, 0, "ebx", "clzero . xsaveerptr . rdpru . . . . wbnoinvd . . ibpb . "
            "ibrs amd-stibp . . . . . . . . amd-ssbd virt-ssbd amd-no-ssb"),
    **_word(0x40000001, 0, "eax", "kvmclock kvm-nopiodelay kvm-mmu . kvm-asyncpf "
            "kvm-steal-time kvm-pv-eoi kvm-pv-unhalt . kvm-pv-tlb-flush kvm-asyncpf-vmexit "
            "kvm-pv-ipi kvm-poll-control kvm-pv-sched-yield kvm-asyncpf-int "
            "kvm-msi-ext-dest-id . . . . . . . . kvmclock-stable-bit"),
}  # fmt: skip
#: Other spellings QEMU accepts for the same bits.
FEATURE_ALIASES = {
    "sse3": "pni", "sse4-1": "sse4.1", "sse4-2": "sse4.2", "i64": "lm", "xd": "nx",
    "ffxsr": "fxsr-opt", "pclmuldq": "pclmulqdq", "sha": "sha-ni",
}  # fmt: skip


def find_entry(entries: list[CpuidEntry], function: int, index: int = 0) -> CpuidEntry | None:
    """The entry for leaf ``function`` (sub-leaf ``index`` where the leaf has them)."""
    for e in entries:
        if e.function == function and (
            not e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX or e.index == index
        ):
            return e
    return None


def has_bit(entries: list[CpuidEntry], feature: FeatureBit) -> bool:
    entry = find_entry(entries, feature.function, feature.index)
    return entry is not None and bool(getattr(entry, feature.register) >> feature.bit & 1)


def with_bit(entries: list[CpuidEntry], feature: FeatureBit, on: bool) -> list[CpuidEntry]:
    """The same CPUID with ``feature`` set or cleared; the leaf must exist."""
    target = find_entry(entries, feature.function, feature.index)
    if target is None:
        raise KeyError(feature.describe())
    value = getattr(target, feature.register)
    value = value | (1 << feature.bit) if on else value & ~(1 << feature.bit)
    updated = target.with_regs(**{feature.register: value})
    return [updated if e is target else e for e in entries]
