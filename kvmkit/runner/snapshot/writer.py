"""Write a snapshot directory atomically: a temporary directory beside the target, every
file fsynced, then one ``rename`` — a crash leaves either no snapshot or a whole one."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from kvmkit import __version__
from kvmkit.errors import KvmError
from kvmkit.kvm.state import VcpuState, VmState
from kvmkit.kvm.vm import Vm
from kvmkit.runner.snapshot.errors import SnapshotError
from kvmkit.runner.snapshot.format import (
    MANIFEST_NAME,
    Manifest,
    MemoryRegion,
    capabilities_needed,
)

_CHUNK = 1 << 20
_ZERO = bytes(_CHUNK)


class MemorySource(Protocol):
    """What the writer reads guest memory from (a :class:`~kvmkit.kvm.GuestMemory`)."""

    guest_phys: int
    size: int

    def memoryview(self) -> memoryview: ...


def capture_state(vm: Vm) -> tuple[list[VcpuState], VmState]:
    """Read every vCPU's state and the VM's.  The caller guarantees that no vCPU of
    ``vm`` is in ``KVM_RUN`` (paused by the machine) for the whole call."""
    try:
        vcpus = vm.vcpus
        if not vcpus:
            raise SnapshotError("the VM has no vCPUs to snapshot")
        msrs = vcpus[0].readable_msrs(vm.kvm.msr_index_list())
        states = [cpu.save_state(msrs) for cpu in vcpus]
        return states, vm.save_state()
    except KvmError as exc:
        raise SnapshotError(f"cannot read the VM state: {exc}") from exc


def _write_memory(dest: Path, region: MemorySource) -> str:
    """Write the region to ``dest`` (zero megabytes become holes), fsync; its SHA-256."""
    sha = hashlib.sha256()
    with region.memoryview() as view, open(dest, "wb") as f:
        for off in range(0, region.size, _CHUNK):
            # a bytes copy: memoryview == bytes compares item by item, bytes uses memcmp
            part = view[off : off + _CHUNK].tobytes()
            sha.update(part)
            if part == _ZERO[: len(part)]:
                f.seek(len(part), os.SEEK_CUR)
            else:
                f.write(part)
        f.truncate(region.size)
        f.flush()
        os.fsync(f.fileno())
    return sha.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_snapshot(
    path: str | os.PathLike[str],
    *,
    vcpus: list[VcpuState],
    vm: VmState,
    memory: Sequence[MemorySource],
    devices: dict[str, Any] | None = None,
    machine: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a snapshot directory at ``path`` (format in :mod:`.format`) and return it.

    ``memory`` is read while this runs: the caller guarantees the guest is paused.
    ``devices`` maps each device name to its ``save()`` dict; ``machine`` is the runner's
    own JSON-able settings.  An existing ``path`` is an error unless ``overwrite``.
    """
    target = Path(path)
    if not memory or not vcpus:
        raise SnapshotError("a snapshot needs guest memory and at least one vCPU")
    if target.exists() and not overwrite:
        raise SnapshotError(f"{target} already exists", hint="pick a new path or overwrite")
    parent = target.parent if str(target.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise SnapshotError(f"cannot create the snapshot in {parent}: {exc}") from exc
    try:
        regions = []
        for i, region in enumerate(sorted(memory, key=lambda r: r.guest_phys)):
            name = f"memory-{i}.bin"
            sha = _write_memory(tmp / name, region)
            regions.append(MemoryRegion(int(region.guest_phys), region.size, name, sha))
        manifest = Manifest(
            vcpus=vcpus,
            vm=vm,
            memory=regions,
            devices=devices or {},
            machine=machine or {},
            capabilities=capabilities_needed(vcpus, vm),
            kvmkit_version=__version__,
        )
        with open(tmp / MANIFEST_NAME, "wb") as f:
            f.write(manifest.to_json())
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=parent))
            os.rename(target, old / "snapshot")
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_dir(parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SnapshotError(f"cannot write the snapshot {target}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
