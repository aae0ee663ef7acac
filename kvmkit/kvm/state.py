"""The complete state of a vCPU and of a VM as KVM holds it, as plain values.

:class:`VcpuState` and :class:`VmState` are what :meth:`Vcpu.save_state` /
:meth:`Vm.save_state` read and :meth:`Vcpu.restore_state` / :meth:`Vm.restore_state`
write back.  Kernel structures that are ABI-stable and opaque to kvmkit (sregs2, XSAVE,
XCRs, debug registers, vCPU events, LAPIC page, irqchip chips, PIT) are kept as the raw
bytes of the C structure, as Firecracker serializes them; what a reader wants to look at
(general registers, MSRs, MP state, CPUID, TSC frequency) is kept as numbers.

``to_dict()`` gives a JSON-able dict (blobs in base64), ``to_bytes()`` its UTF-8 JSON;
``from_dict``/``from_bytes`` validate every field (type, blob length against this host's
structure size) and raise :class:`StateError` for anything else — never a half-built
state that would put a guest on wrong registers.

Order (Firecracker ``vcpu.rs``/QEMU ``kvm_arch_put_registers``): save MP state first
(``KVM_GET_MP_STATE`` flushes pending APIC events), vCPU events last; restore CPUID,
MP state, regs, sregs, XSAVE, XCRs, debug registers, LAPIC (after sregs, which set the
APIC base; before MSRs, since TSC-deadline needs the LAPIC), MSRs (TSC before
TSC-deadline), vCPU events (``KVM_SET_REGS`` clears pending exceptions).  Per VM, the
PIT, clock and irqchip are restored before any vCPU.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from kvmkit.errors import KvmError
from kvmkit.kvm.cpuid import CpuidEntry

#: Bumped when a field is added or changes meaning.
STATE_VERSION = 1

#: MSRs restored after all the others (Firecracker's DEFERRED_MSRS): the TSC deadline
#: is only accepted once IA32_TSC and the LAPIC are in place.
MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
DEFERRED_MSRS = (MSR_IA32_TSC_DEADLINE,)

#: The general registers of ``struct kvm_regs``, in its order (``Vcpu.get_regs`` uses it too).
REG_NAMES = [
    "rax",
    "rbx",
    "rcx",
    "rdx",
    "rsi",
    "rdi",
    "rsp",
    "rbp",
    "r8",
    "r9",
    "r10",
    "r11",
    "r12",
    "r13",
    "r14",
    "r15",
    "rip",
    "rflags",
]
_CPUID_FIELDS = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")
_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1


class StateError(KvmError):
    """A saved vCPU/VM state is malformed or does not fit this host's structures."""


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _unb64(d: dict[str, Any], key: str, *, optional: bool = False) -> bytes | None:
    v = d.get(key)
    if v is None:
        if optional:
            return None
        raise StateError(f"state field {key!r} is missing")
    if not isinstance(v, str):
        raise StateError(f"state field {key!r} must be a base64 string")
    try:
        return base64.b64decode(v.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise StateError(f"state field {key!r} is not valid base64") from None


def _int(d: dict[str, Any], key: str, *, bits: int = 64, optional: bool = False) -> int | None:
    v = d.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < (1 << bits):
        raise StateError(f"state field {key!r} must be an unsigned {bits}-bit integer, not {v!r}")
    return v


def _uints(values: list[Any], bits: int, what: str) -> None:
    """Check a whole list at once (a vCPU has hundreds): each an unsigned ``bits``-bit int."""
    limit = 1 << bits
    ints = set(map(type, values)) <= {int}  # C-speed passes; bool is not int here
    if not (ints and (not values or (min(values) >= 0 and max(values) < limit))):
        bad = next(v for v in values if not (type(v) is int and 0 <= v < limit))
        raise StateError(f"{what} must be an unsigned {bits}-bit integer, not {bad!r}")


def _dict(d: Any, what: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise StateError(f"{what} must be a JSON object")
    return d


@dataclass
class VcpuState:
    """Everything KVM holds for one vCPU.  ``sregs_kind`` says which structure ``sregs``
    holds (``"sregs2"`` — with the PDPTRs — where KVM offers it, else ``"sregs"``);
    ``xsave`` is empty where KVM has no XSAVE, and then ``fpu`` holds the legacy state.
    ``lapic`` is ``None`` for a VM without the in-kernel irqchip.  ``msrs`` is in
    restore order."""

    index: int
    mp_state: int
    regs: dict[str, int]
    sregs_kind: str
    sregs: bytes
    xsave: bytes
    fpu: bytes
    xcrs: bytes
    debugregs: bytes
    events: bytes
    msrs: dict[int, int]
    lapic: bytes | None = None
    tsc_khz: int | None = None
    cpuid: list[CpuidEntry] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "index": self.index,
            "mp_state": self.mp_state,
            "regs": dict(self.regs),
            "sregs_kind": self.sregs_kind,
            "sregs": _b64(self.sregs),
            "xsave": _b64(self.xsave),
            "fpu": _b64(self.fpu),
            "xcrs": _b64(self.xcrs),
            "debugregs": _b64(self.debugregs),
            "events": _b64(self.events),
            "msrs": [[i, v] for i, v in self.msrs.items()],
            "lapic": _b64(self.lapic),
            "tsc_khz": self.tsc_khz,
            "cpuid": [  # in _CPUID_FIELDS order
                [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] for e in self.cpuid
            ],
        }

    @classmethod
    def from_dict(cls, d: Any) -> VcpuState:
        """Parse and validate; raises :class:`StateError` for anything malformed."""
        d = _dict(d, "vCPU state")
        if d.get("version") != STATE_VERSION:
            raise StateError(
                f"vCPU state version {d.get('version')!r} is not {STATE_VERSION}",
                hint="it was written by a different kvmkit",
            )
        regs = _dict(d.get("regs"), "vCPU state field 'regs'")
        if set(regs) != set(REG_NAMES):
            raise StateError("vCPU state field 'regs' must name exactly the 18 registers")
        for name in REG_NAMES:
            _int(regs, name)
        kind = d.get("sregs_kind")
        if kind not in ("sregs2", "sregs"):
            raise StateError(f"vCPU state field 'sregs_kind' is {kind!r}, not sregs2/sregs")
        msrs_raw = d.get("msrs")
        if not isinstance(msrs_raw, list):
            raise StateError("vCPU state field 'msrs' must be a list of [index, value]")
        if not all(isinstance(item, list) and len(item) == 2 for item in msrs_raw):
            raise StateError("vCPU state field 'msrs' must be a list of [index, value]")
        msrs = {item[0]: item[1] for item in msrs_raw}
        _uints([item[0] for item in msrs_raw], 32, "an MSR index")
        _uints(list(msrs.values()), 64, "an MSR value")
        cpuid_raw = d.get("cpuid")
        if not isinstance(cpuid_raw, list):
            raise StateError("vCPU state field 'cpuid' must be a list")
        width = len(_CPUID_FIELDS)
        if not all(isinstance(item, list) and len(item) == width for item in cpuid_raw):
            raise StateError("a CPUID entry must be a list of 7 integers")
        _uints([v for item in cpuid_raw for v in item], 32, "a CPUID entry's field")
        cpuid = [CpuidEntry(*item) for item in cpuid_raw]
        return cls(
            index=_int(d, "index", bits=32) or 0,
            mp_state=_int(d, "mp_state", bits=32) or 0,
            regs={n: int(regs[n]) for n in REG_NAMES},
            sregs_kind=kind,
            sregs=_unb64(d, "sregs") or b"",
            xsave=_unb64(d, "xsave") or b"",
            fpu=_unb64(d, "fpu") or b"",
            xcrs=_unb64(d, "xcrs") or b"",
            debugregs=_unb64(d, "debugregs") or b"",
            events=_unb64(d, "events") or b"",
            msrs=msrs,
            lapic=_unb64(d, "lapic", optional=True),
            tsc_khz=_int(d, "tsc_khz", bits=32, optional=True),
            cpuid=cpuid,
        )

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> VcpuState:
        return cls.from_dict(_loads(data))


@dataclass
class VmState:
    """What KVM holds per VM: the kvmclock, and where they exist the irqchip chips
    (``pic_master``, ``pic_slave``, ``ioapic``: raw ``struct kvm_irqchip``) and the PIT
    (raw ``struct kvm_pit_state2``)."""

    clock_ns: int
    clock_flags: int = 0
    irqchip: dict[str, bytes] = field(default_factory=dict)
    pit2: bytes | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "clock_ns": self.clock_ns,
            "clock_flags": self.clock_flags,
            "irqchip": {k: _b64(v) for k, v in self.irqchip.items()},
            "pit2": _b64(self.pit2),
        }

    @classmethod
    def from_dict(cls, d: Any) -> VmState:
        d = _dict(d, "VM state")
        if d.get("version") != STATE_VERSION:
            raise StateError(f"VM state version {d.get('version')!r} is not {STATE_VERSION}")
        chips = _dict(d.get("irqchip"), "VM state field 'irqchip'")
        if not set(chips) <= set(IRQCHIP_IDS):
            raise StateError(f"VM state field 'irqchip' names unknown chips {sorted(chips)}")
        return cls(
            clock_ns=_int(d, "clock_ns") or 0,
            clock_flags=_int(d, "clock_flags", bits=32) or 0,
            irqchip={k: _unb64(chips, k) or b"" for k in chips},
            pit2=_unb64(d, "pit2", optional=True),
        )

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> VmState:
        return cls.from_dict(_loads(data))


#: ``kvm_irqchip.chip_id`` of each chip, in restore order.
IRQCHIP_IDS = {"pic_master": 0, "pic_slave": 1, "ioapic": 2}


def _loads(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StateError(f"state is not valid JSON: {exc}") from None


def check_blob(name: str, data: bytes | None, size: int) -> None:
    """Raise :class:`StateError` unless ``data`` is exactly ``size`` bytes."""
    if data is None or len(data) != size:
        got = "nothing" if data is None else f"{len(data)} bytes"
        raise StateError(
            f"saved {name} has {got}; this host's structure is {size} bytes",
            hint="the state was saved on a host with a different KVM ABI",
        )


__all__ = [
    "VcpuState",
    "VmState",
    "StateError",
    "STATE_VERSION",
    "IRQCHIP_IDS",
    "DEFERRED_MSRS",
    "check_blob",
]
