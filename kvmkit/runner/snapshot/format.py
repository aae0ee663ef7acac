"""The snapshot manifest: building it and validating it (no I/O here).

A snapshot is a directory::

    manifest.json        this manifest (UTF-8 JSON, at most MAX_MANIFEST_BYTES)
    memory-0.bin         guest memory of region 0, exactly its size, raw bytes
    memory-1.bin         ...

Manifest, format version 1::

    {
      "format": "kvmkit-snapshot",
      "format_version": 1,
      "kvmkit_version": "0.1.0",
      "capabilities": ["IRQCHIP", "PIT2", "SREGS2", "XSAVE", ...],   # KVM caps the state needs
      "vcpu_count": 1,
      "memory": [{"guest_phys": 0, "size": 1048576, "file": "memory-0.bin",
                  "sha256": "<hex of the file>"}],
      "vcpus": [<VcpuState.to_dict()>, ...],       # blobs base64, in vCPU index order
      "vm": <VmState.to_dict()>,
      "devices": {"<device name>": <its save() dict>, ...},
      "machine": {...},                             # the runner's own settings, opaque here
      "checksums": {"vcpu/0": "<hex>", "vm": "<hex>", "devices": "<hex>", "machine": "<hex>"}
    }

Each checksum is the SHA-256 of the part's canonical JSON (``sort_keys``, no spaces).
A reader refuses any other ``format_version``; a writer bumps it when a field changes
meaning or a required one is added.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

from kvmkit.kvm.caps import Cap
from kvmkit.kvm.state import StateError, VcpuState, VmState
from kvmkit.runner.snapshot.errors import SnapshotError

FORMAT = "kvmkit-snapshot"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
MAX_VCPUS = 1024
MAX_REGIONS = 512
PAGE_SIZE = 4096
_MEMORY_FILE = re.compile(r"memory-[0-9]{1,4}\.bin")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def canonical(part: Any) -> bytes:
    """The bytes a part's checksum is taken over."""
    return json.dumps(part, sort_keys=True, separators=(",", ":")).encode()


def digest(part: Any) -> str:
    return hashlib.sha256(canonical(part)).hexdigest()


@dataclass(frozen=True)
class MemoryRegion:
    """One guest memory region and the file holding it."""

    guest_phys: int
    size: int
    file: str
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "guest_phys": self.guest_phys,
            "size": self.size,
            "file": self.file,
            "sha256": self.sha256,
        }


@dataclass
class Manifest:
    """A validated manifest (see the module docstring)."""

    vcpus: list[VcpuState]
    vm: VmState
    memory: list[MemoryRegion]
    devices: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    capabilities: list[str] = field(default_factory=list)
    kvmkit_version: str = ""

    @property
    def vcpu_count(self) -> int:
        return len(self.vcpus)

    def to_dict(self) -> dict[str, Any]:
        vcpus = [v.to_dict() for v in self.vcpus]
        vm = self.vm.to_dict()
        checksums = {f"vcpu/{i}": digest(v) for i, v in enumerate(vcpus)}
        checksums.update(vm=digest(vm), devices=digest(self.devices), machine=digest(self.machine))
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kvmkit_version": self.kvmkit_version,
            "capabilities": sorted(self.capabilities),
            "vcpu_count": len(vcpus),
            "memory": [m.to_dict() for m in self.memory],
            "vcpus": vcpus,
            "vm": vm,
            "devices": self.devices,
            "machine": self.machine,
            "checksums": checksums,
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True).encode()


def capabilities_needed(vcpus: list[VcpuState], vm: VmState) -> list[str]:
    """The KVM capabilities a host needs to restore this state."""
    caps = {Cap.MP_STATE, Cap.VCPU_EVENTS, Cap.DEBUGREGS}
    for v in vcpus:
        if v.sregs_kind == "sregs2":
            caps.add(Cap.SREGS2)
        if v.xsave:
            caps.add(Cap.XSAVE)
        if len(v.xsave) > PAGE_SIZE:
            caps.add(Cap.XSAVE2)
        if v.xcrs:
            caps.add(Cap.XCRS)
    if vm.irqchip:
        caps.add(Cap.IRQCHIP)
    if vm.pit2 is not None:
        caps.update((Cap.PIT2, Cap.PIT_STATE2))
    return sorted(c.name for c in caps)


def _fail(what: str, hint: str | None = None) -> SnapshotError:
    return SnapshotError(f"snapshot manifest: {what}", hint=hint)


def _uint(value: Any, what: str, limit: int = 1 << 64) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < limit:
        raise _fail(f"{what} must be a non-negative integer below {limit:#x}, not {value!r}")
    return value


def parse_manifest(
    data: bytes, *, host_caps: Container[str] | None = None, expect_vcpus: int | None = None
) -> Manifest:
    """Validate ``data`` (the manifest file's bytes) completely and return the manifest.

    ``host_caps`` (names of :class:`~kvmkit.kvm.caps.Cap` the host offers) makes a
    capability the host lacks an error; ``expect_vcpus`` makes a different vCPU count one.
    Raises :class:`SnapshotError` for anything else that is wrong — never another error.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise _fail(f"{len(data)} bytes is more than the {MAX_MANIFEST_BYTES >> 20} MiB limit")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise _fail(f"not valid JSON ({exc})", hint="the file is truncated or corrupted") from None
    if not isinstance(doc, dict):
        raise _fail("not a JSON object")
    if doc.get("format") != FORMAT:
        raise _fail(f"format is {doc.get('format')!r}, not {FORMAT!r}")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise _fail(
            f"format version {version!r}; this kvmkit reads version {FORMAT_VERSION}",
            hint="restore it with the kvmkit that wrote it",
        )
    kvmkit_version = doc.get("kvmkit_version")
    if not isinstance(kvmkit_version, str):
        raise _fail("kvmkit_version must be a string")

    caps = doc.get("capabilities")
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise _fail("capabilities must be a list of names")
    known = set(Cap.__members__)
    for c in caps:
        if c not in known:
            raise _fail(f"needs KVM capability {c!r}, which this kvmkit does not know")
        if host_caps is not None and c not in host_caps:
            raise SnapshotError(
                f"the snapshot needs KVM capability {c}, which this host lacks",
                hint="restore it on a host like the one that took it",
            )

    checksums = doc.get("checksums")
    if not isinstance(checksums, dict):
        raise _fail("checksums must be an object")

    def checked(name: str, part: Any) -> Any:
        want = checksums.get(name)
        if not isinstance(want, str) or digest(part) != want:
            raise _fail(f"checksum of {name} does not match", hint="the manifest is corrupted")
        return part

    count = _uint(doc.get("vcpu_count"), "vcpu_count", MAX_VCPUS + 1)
    vcpus_raw = doc.get("vcpus")
    if not isinstance(vcpus_raw, list) or len(vcpus_raw) != count or count == 0:
        raise _fail(f"vcpus must be a list of vcpu_count ({count}) > 0 states")
    if expect_vcpus is not None and count != expect_vcpus:
        raise SnapshotError(
            f"the snapshot has {count} vCPUs; this machine has {expect_vcpus}",
            hint=f"restore it into a machine with {count} vCPUs",
        )
    try:
        vcpus = [VcpuState.from_dict(checked(f"vcpu/{i}", raw)) for i, raw in enumerate(vcpus_raw)]
        vm = VmState.from_dict(checked("vm", doc.get("vm")))
    except StateError as exc:
        raise _fail(str(exc)) from None
    if [v.index for v in vcpus] != list(range(count)):
        raise _fail("vCPU states must be in index order 0..n-1")

    devices = checked("devices", doc.get("devices"))
    machine = checked("machine", doc.get("machine"))
    if not isinstance(devices, dict) or not isinstance(machine, dict):
        raise _fail("devices and machine must be objects")

    memory = _parse_memory(doc.get("memory"))
    return Manifest(
        vcpus=vcpus,
        vm=vm,
        memory=memory,
        devices=devices,
        machine=machine,
        capabilities=list(caps),
        kvmkit_version=kvmkit_version,
    )


def _parse_memory(raw: Any) -> list[MemoryRegion]:
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_REGIONS:
        raise _fail(f"memory must be a list of 1..{MAX_REGIONS} regions")
    regions: list[MemoryRegion] = []
    for i, r in enumerate(raw):
        if not isinstance(r, dict):
            raise _fail(f"memory region {i} must be an object")
        gpa = _uint(r.get("guest_phys"), f"memory[{i}].guest_phys", 1 << 52)
        size = _uint(r.get("size"), f"memory[{i}].size", 1 << 52)
        if size == 0 or gpa % PAGE_SIZE or size % PAGE_SIZE:
            raise _fail(f"memory region {i} ({gpa:#x}+{size:#x}) is empty or not page-aligned")
        name = r.get("file")
        if not isinstance(name, str) or not _MEMORY_FILE.fullmatch(name):
            raise _fail(f"memory region {i} file name {name!r} is not memory-N.bin")
        sha = r.get("sha256")
        if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
            raise _fail(f"memory region {i} sha256 is not 64 lowercase hex digits")
        regions.append(MemoryRegion(gpa, size, name, sha))
    ordered = sorted(regions, key=lambda m: m.guest_phys)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.guest_phys + a.size > b.guest_phys:
            raise _fail(f"memory regions at {a.guest_phys:#x} and {b.guest_phys:#x} overlap")
    if len({m.file for m in regions}) != len(regions):
        raise _fail("two memory regions name the same file")
    return regions
