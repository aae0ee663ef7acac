"""The guest's CPU model, as QEMU's ``-cpu``: ``host`` (what ``KVM_GET_SUPPORTED_CPUID``
offers) with named features added or removed, and the leaves that describe the platform
filled in by the platform.

>>> model = parse_cpu_model("host,+x2apic,-pku")
>>> cpuid = model.cpuid(kvm, vcpu_index=0, vcpus=4, irqchip=True)

What the platform decides (after the base, before the user's ``+``/``-``):

- x2APIC (leaf 1 ECX[21]) and the TSC-deadline timer (ECX[24]) exist only with the
  in-kernel LAPIC; TSC-deadline also needs ``KVM_CAP_TSC_DEADLINE_TIMER`` (as QEMU
  decides).  Without an irqchip there is no APIC at all: EDX[9] is cleared too.
- Each vCPU's APIC id (leaf 1 EBX[31:24], 0xB/0x1F EDX, 0x8000001E EAX).
- One package of ``vcpus`` cores, one thread each (QEMU 7.2's ``-smp N`` on ``pc``):
  leaf 1 EBX[23:16] and HTT, leaf 4 EAX[31:26], leaves 0xB and 0x1F (SMT, core),
  0x80000008 ECX (AMD core count).
- The hypervisor bit and leaves 0x40000000 ("KVMKVMKVM", max 0x40000001) and
  0x40000001 (the paravirtual features KVM reports).

A ``+feature`` KVM cannot give is a :class:`CpuModelError`, as QEMU refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmkit.kvm.cpuid import (
    FEATURE_ALIASES,
    FEATURES,
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
    CpuidEntry,
    FeatureBit,
    find_entry,
    has_bit,
    with_bit,
)
from kvmkit.runner.errors import RunnerError

if TYPE_CHECKING:
    from kvmkit.kvm import Kvm

#: Base models kvmkit knows.
BASE_MODELS = ("host",)
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
_APIC = FEATURES["apic"]
_X2APIC = FEATURES["x2apic"]
_TSC_DEADLINE = FEATURES["tsc-deadline"]
_HYPERVISOR = FEATURES["hypervisor"]
_HTT = FEATURES["ht"]
_LEVEL_SMT, _LEVEL_CORE = 1, 2


class CpuModelError(RunnerError):
    """A ``--cpu`` that cannot be read or that this KVM cannot give."""

    exit_status = 2


def feature(name: str) -> FeatureBit:
    """The bit of a feature named as QEMU names it (``_`` and ``-`` are the same)."""
    key = name.strip().lower().replace("_", "-")
    key = FEATURE_ALIASES.get(key, key)
    try:
        return FEATURES[key]
    except KeyError:
        raise CpuModelError(
            f"unknown CPU feature {name!r}",
            hint="use QEMU's names, e.g. x2apic, pku, avx2, tsc-deadline, invtsc",
        ) from None


@dataclass(frozen=True)
class CpuModel:
    """A base model and the features the user turned on or off (in order)."""

    base: str = "host"
    changes: tuple[tuple[str, bool], ...] = ()

    def cpuid(self, kvm: Kvm, *, vcpu_index: int, vcpus: int, irqchip: bool) -> list[CpuidEntry]:
        """The CPUID for vCPU ``vcpu_index`` of ``vcpus`` (``irqchip``: the VM has the
        in-kernel LAPIC).  Raises :class:`CpuModelError` for a feature KVM cannot give."""
        from kvmkit.kvm.caps import Cap

        supported = kvm.supported_cpuid()
        tsc_deadline = irqchip and bool(kvm.check_extension(Cap.TSC_DEADLINE_TIMER))
        return build_cpuid(
            supported,
            self,
            vcpu_index=vcpu_index,
            vcpus=vcpus,
            irqchip=irqchip,
            tsc_deadline=tsc_deadline,
        )


def parse_cpu_model(spec: str) -> CpuModel:
    """``host``, ``host,+x2apic,-pku``, ``host,pku=off,avx2=on`` or ``host,avx2``."""
    parts = [p.strip() for p in spec.split(",")]
    base, rest = parts[0].lower(), parts[1:]
    if base not in BASE_MODELS:
        raise CpuModelError(
            f"unknown CPU model {parts[0]!r}: kvmkit offers {', '.join(BASE_MODELS)}",
            hint="e.g. --cpu host,+x2apic,-pku",
        )
    changes = []
    for part in rest:
        if not part:
            continue
        if part[0] in "+-":
            name, on = part[1:], part[0] == "+"
        elif "=" in part:
            name, value = part.split("=", 1)
            if value.lower() not in ("on", "off", "true", "false", "yes", "no"):
                raise CpuModelError(f"--cpu {part!r}: give {name}=on or {name}=off")
            on = value.lower() in ("on", "true", "yes")
        else:
            name, on = part, True
        feature(name)  # unknown names fail here, with the spelling the user gave
        changes.append((name, on))
    return CpuModel(base, tuple(changes))


def _bits_for(count: int) -> int:
    """Bits an APIC id needs to number ``count`` things (QEMU's apicid_bitwidth_for_count)."""
    return max(count - 1, 0).bit_length()


def _topology(entries: list[CpuidEntry], apic_id: int, vcpus: int) -> list[CpuidEntry]:
    core_bits = _bits_for(vcpus)
    out = []
    for e in entries:
        if e.function == 1:
            ebx = (e.ebx & 0xFFFF) | ((apic_id & 0xFF) << 24)
            edx = e.edx & ~(1 << _HTT.bit)
            if vcpus > 1:
                ebx |= (vcpus & 0xFF) << 16
                edx |= 1 << _HTT.bit
            e = e.with_regs(ebx=ebx, edx=edx)
        elif e.function == 4 and e.eax & 0x1F:  # a described cache
            level = e.eax >> 5 & 7
            sharing = vcpus - 1 if level == 3 else 0
            e = e.with_regs(eax=(e.eax & 0x3FFF) | (sharing << 14) | ((vcpus - 1) << 26))
        elif e.function in (0xB, 0x1F):
            continue  # replaced below
        elif e.function == 0x80000008:
            e = e.with_regs(ecx=(e.ecx & ~0xF0FF) | (core_bits << 12) | (vcpus - 1))
        elif e.function == 0x8000001E:
            e = e.with_regs(eax=apic_id, ebx=apic_id & 0xFF, ecx=0)
        out.append(e)
    for function in (0xB, 0x1F):
        if find_entry(entries, function) is None:
            continue
        flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        out += [
            CpuidEntry(function, 0, flags, 0, 1, (_LEVEL_SMT << 8) | 0, apic_id),
            CpuidEntry(function, 1, flags, core_bits, vcpus, (_LEVEL_CORE << 8) | 1, apic_id),
            CpuidEntry(function, 2, flags, 0, 0, 2, apic_id),
        ]
    return out


def _hypervisor_leaves(entries: list[CpuidEntry], supported: list[CpuidEntry]) -> list[CpuidEntry]:
    kvm_features = find_entry(supported, 0x40000001)
    sig = [int.from_bytes(KVM_SIGNATURE[i : i + 4], "little") for i in (0, 4, 8)]
    out = [e for e in entries if not 0x40000000 <= e.function <= 0x400000FF]
    out.append(CpuidEntry(0x40000000, 0, 0, 0x40000001, *sig))
    out.append(
        CpuidEntry(0x40000001, 0, 0, kvm_features.eax if kvm_features else 0, 0, 0,
                   kvm_features.edx if kvm_features else 0)
    )  # fmt: skip
    return with_bit(out, _HYPERVISOR, True)


def build_cpuid(
    supported: list[CpuidEntry],
    model: CpuModel,
    *,
    vcpu_index: int,
    vcpus: int,
    irqchip: bool,
    tsc_deadline: bool,
) -> list[CpuidEntry]:
    """The CPUID of one vCPU: ``supported`` (KVM_GET_SUPPORTED_CPUID), the platform's
    leaves, then the model's changes.  ``tsc_deadline``: the in-kernel LAPIC offers it."""
    if not 1 <= vcpus <= 255 or not 0 <= vcpu_index < vcpus:
        raise CpuModelError(f"vCPU {vcpu_index} of {vcpus}: give 1 to 255 vCPUs")
    entries = _hypervisor_leaves(list(supported), supported)
    entries = _topology(entries, vcpu_index, vcpus)
    entries = with_bit(entries, _X2APIC, irqchip and has_bit(supported, _X2APIC))
    entries = with_bit(entries, _TSC_DEADLINE, tsc_deadline)
    entries = with_bit(entries, _APIC, irqchip and has_bit(supported, _APIC))
    for name, on in model.changes:
        bit = feature(name)
        if on and not _available(bit, supported, irqchip=irqchip, tsc_deadline=tsc_deadline):
            raise CpuModelError(
                f"--cpu {model.base},+{name}: KVM on this host cannot give {name} "
                f"({bit.describe()})",
                hint=_why_not(bit, irqchip),
            )
        if find_entry(entries, bit.function, bit.index) is None:
            continue  # removing a bit of a leaf the CPU does not have: nothing to do
        entries = with_bit(entries, bit, on)
    return entries


def _available(bit: FeatureBit, supported: list[CpuidEntry], *, irqchip: bool,
               tsc_deadline: bool) -> bool:  # fmt: skip
    if bit == _TSC_DEADLINE:
        return tsc_deadline
    if bit in (_X2APIC, _APIC):
        return irqchip and has_bit(supported, bit)
    if bit in (_HYPERVISOR, _HTT):
        return True
    return has_bit(supported, bit)


def _why_not(bit: FeatureBit, irqchip: bool) -> str:
    if bit in (_X2APIC, _APIC, _TSC_DEADLINE) and not irqchip:
        return "it needs the in-kernel LAPIC: run without --no-irqchip"
    return "KVM_GET_SUPPORTED_CPUID lacks it; drop it"
