"""What to tell a user when KVM stops a guest: the name of an internal error's suberror,
the mode, and the instruction bytes at RIP (read through the guest's own page tables),
so a KVM backend limit (an instruction the emulator does not know) can be told from a
VMM bug (a bad register or table the runner set up).
"""

from __future__ import annotations

from typing import Any

from kvmkit.errors import KvmkitError
from kvmkit.kvm import InternalError, Vcpu, Vm

#: ``KVM_INTERNAL_ERROR_*`` (<linux/kvm.h>) and what each means for the user.
SUBERRORS = {
    1: ("EMULATION", "KVM's instruction emulator could not emulate the instruction at RIP"),
    2: ("SIMUL_EX", "a fault occurred while KVM was delivering another exception"),
    3: ("DELIVERY_EV", "KVM could not deliver an event (exception/interrupt) to the guest"),
    4: ("UNEXPECTED_EXIT_REASON", "the hardware exited with a reason KVM does not handle"),
}
_EMULATION_FLAG_INSTRUCTION_BYTES = 1
_INSN_MAX = 15
_PRESENT, _LARGE = 1, 1 << 7
_ADDR = 0x000F_FFFF_FFFF_F000


def cpu_mode(sregs: Any) -> str:
    """``real``, ``protected`` (32-bit, paging or not) or ``long`` (64-bit or compat)."""
    if sregs.cr0 & 1 == 0:
        return "real"
    if sregs.efer & 0x400:
        return "long" if sregs.cs.l else "compatibility"
    return "protected"


def translate(vm: Vm, sregs: Any, vaddr: int) -> int:
    """The guest-physical address of linear address ``vaddr`` under the vCPU's paging
    (none, 32-bit, PAE or 4-level).  Raises :class:`KvmkitError` for a page that is not
    present or tables outside guest RAM."""
    if not sregs.cr0 & (1 << 31):
        return vaddr
    if sregs.efer & 0x400:  # 4-level
        levels, table, shift, width = 4, sregs.cr3 & _ADDR, 39, 8
    elif sregs.cr4 & (1 << 5):  # PAE: 4-entry PDPT, then 2 levels
        pdpte = int.from_bytes(vm.read((sregs.cr3 & ~0x1F) + ((vaddr >> 30) & 3) * 8, 8), "little")
        if not pdpte & _PRESENT:
            raise KvmkitError(f"{vaddr:#x} is not mapped (PDPT entry not present)")
        levels, table, shift, width = 2, pdpte & _ADDR, 21, 8
    else:  # 32-bit: 2 levels of 1024 4-byte entries
        levels, table, shift, width = 2, sregs.cr3 & 0xFFFFF000, 22, 4
    bits = 9 if width == 8 else 10
    for level in range(levels):
        index = (vaddr >> shift) & ((1 << bits) - 1)
        entry = int.from_bytes(vm.read(table + index * width, width), "little")
        if not entry & _PRESENT:
            raise KvmkitError(
                f"{vaddr:#x} is not mapped (level-{levels - level} entry not present)"
            )
        if level < levels - 1 and entry & _LARGE:
            mask = (1 << shift) - 1
            base = entry & (0xFFC00000 if width == 4 else _ADDR) & ~mask
            return base | (vaddr & mask)
        table = entry & (0xFFFFF000 if width == 4 else _ADDR)
        shift -= bits
    return int(table | (vaddr & 0xFFF))


def bytes_at_rip(vcpu: Vcpu, sregs: Any, rip: int) -> bytes:
    """Up to 15 instruction bytes at CS:RIP, stopping at a page that is not mapped."""
    linear = rip if cpu_mode(sregs) == "long" else (sregs.cs.base + rip) & 0xFFFFFFFF
    out = b""
    while len(out) < _INSN_MAX:
        here = linear + len(out)
        chunk = min(_INSN_MAX - len(out), 0x1000 - (here & 0xFFF))
        try:
            out += vcpu.vm.read(translate(vcpu.vm, sregs, here), chunk)
        except KvmkitError:
            break
    return out


def describe_internal_error(exit_: InternalError, vcpu: Vcpu) -> str:
    """One paragraph for a crash report: suberror name and meaning, mode, CPL, RIP and
    the bytes there (and the bytes KVM itself reported, when it did)."""
    name, meaning = SUBERRORS.get(exit_.suberror, (f"suberror {exit_.suberror}", "unknown"))
    parts = [f"KVM internal error {name} ({meaning})"]
    try:
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    except KvmkitError as exc:
        return f"{parts[0]}; registers unreadable: {exc}"
    code = bytes_at_rip(vcpu, sregs, regs.rip)
    parts.append(
        f"in {cpu_mode(sregs)} mode, CPL {sregs.cs.dpl}, at RIP {regs.rip:#x}: "
        + (f"bytes {code.hex(' ')}" if code else "no readable bytes there")
    )
    data = exit_.data
    if exit_.suberror == 1 and len(data) >= 3 and data[0] & _EMULATION_FLAG_INSTRUCTION_BYTES:
        raw = b"".join(d.to_bytes(8, "little") for d in data[1:3])
        size = min(raw[0], _INSN_MAX)
        parts.append(f"KVM saw {raw[1 : 1 + size].hex(' ')}")
    elif data:
        parts.append("data " + " ".join(f"{d:#x}" for d in data))
    hint = (
        "an instruction this KVM backend cannot emulate (a backend limit, e.g. PVM runs "
        "CPL-0 and 32-bit code through the emulator)"
        if exit_.suberror == 1
        else "guest state KVM could not handle"
    )
    return (
        "; ".join(parts) + f". Likely cause: {hint}; if the bytes are not an instruction "
        "the guest meant to run, the VMM set up the guest wrongly."
    )
