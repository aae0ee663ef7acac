"""The CPU model (``--cpu``): QEMU's feature names, the platform's leaves, refusals of what
KVM cannot give — and a guest on the real /dev/kvm reading CPUID and seeing the bits."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmkit.kvm import IoOut, Kvm, Vm
from kvmkit.kvm.cpuid import FEATURES, find_entry, has_bit
from kvmkit.kvm.modes import setup_long_mode
from kvmkit.runner.cpu import CpuModel, CpuModelError, build_cpuid, parse_cpu_model
from kvmkit.runner.machine import RunResult

REPORT_PORT = 0x500


def test_parse_spellings() -> None:
    assert parse_cpu_model("host") == CpuModel("host", ())
    model = parse_cpu_model("host,+x2apic,-pku,avx2=off,sse4_2,lahf_lm=on")
    assert model.changes == (
        ("x2apic", True), ("pku", False), ("avx2", False), ("sse4_2", True), ("lahf_lm", True),
    )  # fmt: skip
    with pytest.raises(CpuModelError, match="unknown CPU model 'qemu64'"):
        parse_cpu_model("qemu64")
    with pytest.raises(CpuModelError, match="unknown CPU feature 'nonsense'"):
        parse_cpu_model("host,+nonsense")
    with pytest.raises(CpuModelError, match="give avx2=on or avx2=off"):
        parse_cpu_model("host,avx2=maybe")


def test_feature_table_matches_qemu_positions() -> None:
    # A few spot checks against target/i386/cpu.c feature_word_info.
    assert FEATURES["x2apic"].describe() == "CPUID.(EAX=0x1):ECX[21]"
    assert FEATURES["tsc-deadline"].describe() == "CPUID.(EAX=0x1):ECX[24]"
    assert FEATURES["pku"].describe() == "CPUID.(EAX=0x7):ECX[3]"
    assert FEATURES["avx2"].describe() == "CPUID.(EAX=0x7):EBX[5]"
    assert FEATURES["lm"].describe() == "CPUID.(EAX=0x80000001):EDX[29]"
    assert FEATURES["xsaves"].describe() == "CPUID.(EAX=0xd,ECX=1):EAX[3]"
    assert FEATURES["kvm-pv-unhalt"].describe() == "CPUID.(EAX=0x40000001):EAX[7]"


@pytest.fixture
def kvm(require_kvm: None) -> Kvm:
    with Kvm() as k:
        yield k  # type: ignore[misc]


def test_platform_leaves(kvm: Kvm) -> None:
    supported = kvm.supported_cpuid()
    cpuid = build_cpuid(
        supported, CpuModel(), vcpu_index=2, vcpus=4, irqchip=True, tsc_deadline=True
    )
    leaf1 = find_entry(cpuid, 1)
    assert leaf1 is not None
    assert leaf1.ebx >> 24 == 2 and leaf1.ebx >> 16 & 0xFF == 4  # APIC id, logical count
    assert has_bit(cpuid, FEATURES["ht"]) and has_bit(cpuid, FEATURES["hypervisor"])
    assert has_bit(cpuid, FEATURES["tsc-deadline"])
    assert has_bit(cpuid, FEATURES["x2apic"]) == has_bit(supported, FEATURES["x2apic"])
    sig = find_entry(cpuid, 0x40000000)
    assert sig is not None and sig.eax >= 0x40000001
    assert struct.pack("<3I", sig.ebx, sig.ecx, sig.edx) == b"KVMKVMKVM\0\0\0"
    kvm_features = find_entry(supported, 0x40000001)
    assert find_entry(cpuid, 0x40000001).eax == (kvm_features.eax if kvm_features else 0)  # type: ignore[union-attr]
    if find_entry(supported, 0xB) is not None:
        smt, core = find_entry(cpuid, 0xB, 0), find_entry(cpuid, 0xB, 1)
        assert smt is not None and core is not None
        assert (smt.ebx, smt.ecx >> 8 & 0xFF, smt.edx) == (1, 1, 2)
        assert (core.eax, core.ebx, core.ecx >> 8 & 0xFF, core.edx) == (2, 4, 2, 2)
    # without the in-kernel LAPIC there is no APIC, x2APIC or TSC deadline to offer
    bare = build_cpuid(
        supported, CpuModel(), vcpu_index=0, vcpus=1, irqchip=False, tsc_deadline=False
    )
    for name in ("apic", "x2apic", "tsc-deadline", "ht"):
        assert not has_bit(bare, FEATURES[name]), name
    with pytest.raises(CpuModelError, match="needs the in-kernel LAPIC"):
        build_cpuid(
            supported, parse_cpu_model("host,+x2apic"), vcpu_index=0, vcpus=1, irqchip=False,
            tsc_deadline=False,
        )  # fmt: skip


def test_a_feature_kvm_lacks_is_refused(kvm: Kvm) -> None:
    supported = kvm.supported_cpuid()
    missing = next(
        (
            n
            for n in ("pku", "pks", "smep", "smap", "rdpru", "la57")
            if not has_bit(supported, FEATURES[n])
        ),
        None,
    )
    if missing is None:
        pytest.skip("this KVM offers every feature the test would ask for")
    with pytest.raises(CpuModelError) as info:
        parse_cpu_model(f"host,+{missing}").cpuid(kvm, vcpu_index=0, vcpus=1, irqchip=True)
    assert f"KVM on this host cannot give {missing} (CPUID." in str(info.value)
    assert "\n" not in str(info.value) and info.value.exit_status == 2


# Long mode: for each (leaf, sub-leaf, register) run CPUID and OUT the register to 0x500.
_REG_TO_EAX = {"eax": b"", "ebx": b"\x89\xd8", "ecx": b"\x89\xc8", "edx": b"\x89\xd0"}


def cpuid_reporter(queries: list[tuple[int, int, str]]) -> bytes:
    code = b""
    for leaf, sub, reg in queries:
        code += b"\xb8" + struct.pack("<I", leaf)  # mov eax, leaf
        code += b"\xb9" + struct.pack("<I", sub)  # mov ecx, sub-leaf
        code += b"\x0f\xa2"  # cpuid
        code += _REG_TO_EAX[reg]  # mov eax, reg
        code += b"\x66\xba" + struct.pack("<H", REPORT_PORT)  # mov dx, 0x500
        code += b"\xef"  # out dx, eax
    # end with an OUT, not HLT: with the in-kernel irqchip HLT waits in the kernel
    return code + b"\x66\xba" + struct.pack("<H", REPORT_PORT + 1) + b"\xef"


def run_reporter(vm: Vm, cpuid: list, queries: list[tuple[int, int, str]]) -> list[int]:  # type: ignore[type-arg]
    vm.add_memory(0, 0x100000)
    vm.write(0x1000, cpuid_reporter(queries))
    cpu = vm.create_vcpu(0)
    setup_long_mode(cpu, entry=0x1000, stack=0x8000)
    cpu.set_cpuid2(cpuid)
    values = []
    for _ in queries:
        exit_ = cpu.run()
        assert isinstance(exit_, IoOut) and exit_.port == REPORT_PORT, exit_
        values.append(int.from_bytes(exit_.data, "little"))
    assert cpu.run() == IoOut(port=REPORT_PORT + 1, size=4, data=struct.pack("<I", values[-1]))
    return values


@pytest.mark.parametrize("spec", ["host,+x2apic", "host,-x2apic,-hypervisor"])
def test_the_guest_sees_the_requested_bits(kvm: Kvm, spec: str) -> None:
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        cpuid = parse_cpu_model(spec).cpuid(kvm, vcpu_index=0, vcpus=2, irqchip=True)
        ecx1, ebx1, ebx_sig, ecx_sig, edx_sig = run_reporter(
            vm,
            cpuid,
            [(1, 0, "ecx"), (1, 0, "ebx"), (0x40000000, 0, "ebx"), (0x40000000, 0, "ecx"),
             (0x40000000, 0, "edx")],
        )  # fmt: skip
    want_x2apic = spec.startswith("host,+x2apic")
    assert bool(ecx1 >> 21 & 1) == want_x2apic
    assert bool(ecx1 >> 31 & 1) == want_x2apic  # hypervisor bit, removed in the second case
    assert ebx1 >> 24 == 0 and ebx1 >> 16 & 0xFF == 2
    assert struct.pack("<3I", ebx_sig, ecx_sig, edx_sig) == b"KVMKVMKVM\0\0\0"


# A flat long-mode image for `kvmkit run`: exit code = CPUID.1:ECX[21] (x2APIC) + 2 *
# CPUID.1:ECX[31] (hypervisor) + 4 * (CPUID.1:EBX[31:24] == 0).
_EXIT_WITH_BITS = bytes.fromhex(
    "b801000000"  # mov eax, 1
    "31c9"  # xor ecx, ecx
    "0fa2"  # cpuid
    "89c8"  # mov eax, ecx
    "c1e815"  # shr eax, 21
    "83e001"  # and eax, 1
    "89ce"  # mov esi, ecx
    "c1ee1f"  # shr esi, 31
    "01f6"  # add esi, esi
    "09f0"  # or eax, esi
    "c1eb18"  # shr ebx, 24
    "85db"  # test ebx, ebx
    "7503"  # jnz +3
    "83c804"  # or eax, 4
    "e6f4"  # out 0xf4, al
    "f4"  # hlt
)


@pytest.mark.parametrize(
    ("cpu", "vcpus", "code"),
    [("host", 2, 7), ("host,-x2apic", 2, 6), ("host,-hypervisor", 2, 5)],
)
def test_kvmkit_run_cpu_option_reaches_the_guest(
    tmp_path: Path, run_image: Callable[..., RunResult], cpu: str, vcpus: int, code: int
) -> None:
    with Kvm() as kvm:
        if not has_bit(kvm.supported_cpuid(), FEATURES["x2apic"]):
            pytest.skip("this KVM does not offer x2APIC")
    image = tmp_path / "bits.bin"
    image.write_bytes(_EXIT_WITH_BITS)
    result = run_image(image, load_addr=0x100000, cpu=cpu, vcpus=vcpus, timeout=60.0)
    assert (result.reason, result.exit_code) == ("exit", code), result.detail
