"""Snapshots of minimal VMs: a versioned directory of a JSON manifest and raw memory.

Design
------
- **Where**: under :mod:`kvmkit.runner` because a snapshot is VMM policy — which state
  makes a machine, how devices' ``save()`` dicts and the runner's settings are kept — while
  :mod:`kvmkit.kvm` only reads and writes KVM state (:class:`~kvmkit.kvm.state.VcpuState`,
  :class:`~kvmkit.kvm.state.VmState`) and maps memory.
- **Format** (:mod:`.format`): ``manifest.json`` (format name and version, kvmkit
  version, the KVM capabilities the state needs, vCPU count, memory layout, per-vCPU and VM
  state with base64 blobs, devices' dicts, the runner's settings, SHA-256 of every part)
  plus ``memory-N.bin`` per region, raw, exactly the region's size (sparse where zero).
  JSON, not msgpack: readable with ``jq``, no extra dependency, and the state is small.
- **Writing** (:mod:`.writer`): temp dir beside the target, fsync every file and the dir,
  one rename.  Memory is read while the guest is paused (the caller's guarantee).
- **Reading** (:mod:`.reader`): every field validated, every failure a
  :class:`SnapshotError` before any guest runs (truncated/corrupted, other version, a
  capability the host lacks, a different vCPU count, memory file of the wrong size).
- **Restore**: memory files mapped ``MAP_PRIVATE`` (lazy, copy-on-write, as Firecracker)
  so restore time does not grow with RAM; ``eager=True`` reads (and hashes) it all first.
  Lazy restore checks sizes, not memory hashes, unless asked (``verify=True``).

Typical use by a machine (vCPUs paused)::

    vcpus, vm_state = capture_state(vm)
    write_snapshot(path, vcpus=vcpus, vm=vm_state, memory=vm.regions,
                   devices={d.name: d.save() for d in devices}, machine=settings)

    snap = Snapshot.open(path, kvm=kvm, expect_vcpus=n)
    vm = kvm.create_vm(); create irqchip/PIT as the snapshot's machine settings say
    snap.map_memory(vm, eager=False); snap.restore_state(vm)
    for d in devices: d.load(snap.manifest.devices[d.name])
"""

from kvmkit.runner.snapshot.errors import SnapshotError
from kvmkit.runner.snapshot.format import (
    FORMAT_VERSION,
    Manifest,
    MemoryRegion,
    parse_manifest,
)
from kvmkit.runner.snapshot.reader import Snapshot, host_capabilities
from kvmkit.runner.snapshot.writer import capture_state, write_snapshot

__all__ = [
    "Snapshot",
    "write_snapshot",
    "capture_state",
    "SnapshotError",
    "Manifest",
    "MemoryRegion",
    "parse_manifest",
    "host_capabilities",
    "FORMAT_VERSION",
]
