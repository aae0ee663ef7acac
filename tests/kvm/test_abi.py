"""The cffi layer against the kernel ABI: ioctl numbers against the header's macros, and
struct sizes and offsets against what gcc itself computes from <linux/kvm.h>."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kvmkit._ffi import ffi, lib
from kvmkit.kvm import ioctls
from kvmkit.kvm.caps import Cap

STRUCT_FIELDS = {
    "struct kvm_regs": ["rax", "rsp", "r15", "rip", "rflags"],
    "struct kvm_sregs": [
        "cs",
        "tr",
        "gdt",
        "idt",
        "cr0",
        "cr3",
        "efer",
        "apic_base",
        "interrupt_bitmap",
    ],
    "struct kvm_segment": ["base", "limit", "selector", "type", "dpl", "l", "g", "unusable"],
    "struct kvm_dtable": ["base", "limit"],
    "struct kvm_fpu": ["fpr", "fcw", "last_ip", "xmm", "mxcsr"],
    "struct kvm_msr_entry": ["index", "data"],
    "struct kvm_msrs": ["nmsrs", "entries"],
    "struct kvm_msr_list": ["nmsrs", "indices"],
    "struct kvm_cpuid_entry2": ["function", "index", "flags", "eax", "edx"],
    "struct kvm_cpuid2": ["nent", "entries"],
    "struct kvm_run": [
        "immediate_exit",
        "exit_reason",
        "cr8",
        "apic_base",
        "io",
        "mmio",
        "internal",
        "system_event",
        "debug",
        "hypercall",
        "fail_entry",
    ],
    "struct kvm_userspace_memory_region": [
        "slot",
        "flags",
        "guest_phys_addr",
        "memory_size",
        "userspace_addr",
    ],
    "struct kvm_dirty_log": ["slot", "dirty_bitmap"],
    "struct kvm_irq_level": ["irq", "level"],
    "struct kvm_pit_config": ["flags"],
    "struct kvm_guest_debug": ["control", "arch"],
    "struct kvm_lapic_state": ["regs"],
    "struct kvm_vcpu_events": ["exception", "interrupt", "nmi", "sipi_vector", "flags", "smi"],
    "struct kvm_clock_data": ["clock", "flags"],
    "struct kvm_mp_state": ["mp_state"],
    "struct kvm_irqfd": ["fd", "gsi", "flags", "resamplefd"],
    "struct kvm_ioeventfd": ["datamatch", "addr", "len", "fd", "flags"],
    "struct kvm_msi": ["address_lo", "address_hi", "data", "flags", "devid"],
    "struct kvm_irq_routing_irqchip": ["irqchip", "pin"],
    "struct kvm_irq_routing_msi": ["address_lo", "address_hi", "data"],
    "struct kvm_irq_routing_entry": ["gsi", "type", "flags", "u"],
    "struct kvm_irq_routing": ["nr", "flags", "entries"],
    "struct kvm_sregs2": ["cs", "ldt", "idt", "cr8", "efer", "apic_base", "flags", "pdptrs"],
    "struct kvm_xsave": ["region"],
    "struct kvm_xcr": ["xcr", "reserved", "value"],
    "struct kvm_xcrs": ["nr_xcrs", "flags", "xcrs"],
    "struct kvm_debugregs": ["db", "dr6", "dr7", "flags"],
    "struct kvm_irqchip": ["chip_id"],
    "struct kvm_pit_state2": ["flags"],
    "struct kvm_enable_cap": ["cap", "flags", "args"],
    "struct kvm_clear_dirty_log": ["slot", "num_pages", "first_page", "dirty_bitmap"],
    "struct kvm_dirty_gfn": ["flags", "slot", "offset"],
    "kvmkit_run_io": ["direction", "size", "port", "count", "data_offset"],
    "kvmkit_run_mmio": ["phys_addr", "data", "len", "is_write"],
}


def test_every_ioctl_number_matches_the_header() -> None:
    assert len(ioctls.ALL) >= 53
    for name, value in ioctls.ALL.items():
        assert value == getattr(lib, name), (
            f"{name}: kvmkit {value:#x} != header {getattr(lib, name):#x}"
        )


def test_cap_values_match_the_header(tmp_path: Path) -> None:
    probe = _compile_and_run(
        tmp_path,
        "\n".join(f'printf("%d\\n", KVM_CAP_{c.name});' for c in Cap),
    )
    assert [int(x) for x in probe] == [c.value for c in Cap]


def _compile_and_run(tmp_path: Path, body: str) -> list[str]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    src = tmp_path / "probe.c"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <linux/kvm.h>\n"
        "typedef __typeof__(((struct kvm_run *)0)->io) kvmkit_run_io;\n"
        "typedef __typeof__(((struct kvm_run *)0)->mmio) kvmkit_run_mmio;\n"
        f"int main(void) {{\n{body}\nreturn 0; }}\n"
    )
    exe = tmp_path / "probe"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True, capture_output=True)
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split()


def test_struct_sizes_and_offsets_match_gcc(tmp_path: Path) -> None:
    lines = []
    expected = []
    for ctype, fields in STRUCT_FIELDS.items():
        lines.append(f'printf("%zu\\n", sizeof({ctype}));')
        expected.append(ffi.sizeof(ctype))
        for f in fields:
            lines.append(f'printf("%zu\\n", offsetof({ctype}, {f}));')
            expected.append(ffi.offsetof(ctype, f))
    got = [int(x) for x in _compile_and_run(tmp_path, "\n".join(lines))]
    assert got == expected
    assert ffi.sizeof("struct kvm_regs") == 144
    assert ffi.sizeof("struct kvm_sregs") == 312
    assert ffi.sizeof("struct kvm_userspace_memory_region") == 32
    # the sizes the kernel ABI fixes for the irqfd/ioeventfd/MSI/routing structures
    assert ffi.sizeof("struct kvm_irqfd") == 32
    assert ffi.sizeof("struct kvm_ioeventfd") == 64
    assert ffi.sizeof("struct kvm_msi") == 32
    assert ffi.sizeof("struct kvm_irq_routing_entry") == 48
    assert ffi.sizeof("struct kvm_dirty_gfn") == 16  # kvmkit.kvm.dirty reads it as 2 u64
    assert ffi.sizeof("struct kvm_xsave") == 4096
    assert ffi.sizeof("struct kvm_irqchip") == 520


def test_exit_kinds_agree_between_the_c_fast_path_and_python() -> None:
    from kvmkit.runner.stats import KINDS

    assert len(KINDS) == lib.KVMKIT_NR_KINDS
    for i, name in enumerate(KINDS):
        assert getattr(lib, f"KVMKIT_KIND_{name.upper()}") == i, name
