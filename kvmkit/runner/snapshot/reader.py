"""Open a snapshot, validate it against this host, map its memory and put its state back."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from kvmkit.errors import KvmError
from kvmkit.kvm.caps import Cap
from kvmkit.kvm.memory import GuestMemory
from kvmkit.kvm.system import Kvm
from kvmkit.kvm.vcpu import Vcpu
from kvmkit.kvm.vm import Vm
from kvmkit.runner.snapshot.errors import SnapshotError
from kvmkit.runner.snapshot.format import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    Manifest,
    MemoryRegion,
    parse_manifest,
)

_CHUNK = 1 << 20


def host_capabilities(kvm: Kvm) -> set[str]:
    """Names of the :class:`Cap` this host offers."""
    return {c.name for c in Cap if kvm.check_extension(c) > 0}


class _HostCaps:
    """``name in caps``: whether this host offers capability ``name`` — asked only for
    the few a manifest names, not for all of :class:`Cap`."""

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm

    def __contains__(self, name: object) -> bool:
        cap = Cap.__members__.get(name) if isinstance(name, str) else None
        return cap is not None and self.kvm.check_extension(cap) > 0


class Snapshot:
    """A validated snapshot directory.  :meth:`open` checks the manifest (format,
    version, checksums, capabilities, vCPU count) and that every memory file exists with
    exactly its region's size; :meth:`verify_memory` also hashes the memory."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        kvm: Kvm | None = None,
        expect_vcpus: int | None = None,
    ) -> Snapshot:
        """Read and validate the snapshot at ``path``.  With ``kvm``, a capability the
        host lacks is an error; with ``expect_vcpus``, a different vCPU count is."""
        root = Path(path)
        mpath = root / MANIFEST_NAME
        try:
            with open(mpath, "rb") as f:
                data = f.read(MAX_MANIFEST_BYTES + 1)
        except FileNotFoundError:
            raise SnapshotError(
                f"{root} is not a snapshot: it has no {MANIFEST_NAME}",
                hint="name the directory `kvmkit run --snapshot` wrote",
            ) from None
        except OSError as exc:
            raise SnapshotError(f"cannot read {mpath}: {exc.strerror}") from None
        caps = _HostCaps(kvm) if kvm is not None else None
        manifest = parse_manifest(data, host_caps=caps, expect_vcpus=expect_vcpus)
        for region in manifest.memory:
            file = root / region.file
            try:
                size = file.stat().st_size
            except OSError:
                raise SnapshotError(f"snapshot memory file {file} is missing") from None
            if size != region.size:
                raise SnapshotError(
                    f"snapshot memory file {file} has {size} bytes; its region has {region.size}",
                    hint="the snapshot is truncated or corrupted",
                )
        return cls(root, manifest)

    def memory_file(self, region: MemoryRegion) -> Path:
        return self.path / region.file

    def verify_memory(self) -> None:
        """Hash every memory file against the manifest (reads all of it)."""
        for region in self.manifest.memory:
            sha = hashlib.sha256()
            with open(self.memory_file(region), "rb") as f:
                while chunk := f.read(_CHUNK):
                    sha.update(chunk)
            if sha.hexdigest() != region.sha256:
                raise SnapshotError(
                    f"snapshot memory file {self.memory_file(region)} does not match its checksum",
                    hint="the snapshot is corrupted",
                )

    def map_memory(
        self, vm: Vm, *, eager: bool = False, verify: bool | None = None
    ) -> list[GuestMemory]:
        """Add every region to ``vm``.

        Lazy (default): each file is mapped ``MAP_PRIVATE`` — pages fault in from the
        page cache as the guest touches them, the guest's writes are private copies, so
        restore time does not grow with RAM; memory is not hashed unless ``verify``.
        ``eager``: anonymous memory filled by reading each file now, hashed while read
        unless ``verify=False``.  A mismatch removes nothing already added: the caller
        discards the VM (its guest never ran).
        """
        verify = eager if verify is None else verify
        if verify and not eager:
            self.verify_memory()
        out = []
        try:
            for region in self.manifest.memory:
                file = self.memory_file(region)
                if eager:
                    mem = vm.add_memory(region.guest_phys, region.size)
                    self._fill(mem, file, region, verify)
                else:
                    mem = vm.add_memory(region.guest_phys, region.size, backing=file, private=True)
                out.append(mem)
        except KvmError as exc:
            raise SnapshotError(f"cannot map the snapshot's memory: {exc}") from exc
        except OSError as exc:
            raise SnapshotError(f"cannot read the snapshot's memory: {exc}") from exc
        return out

    @staticmethod
    def _fill(mem: GuestMemory, file: Path, region: MemoryRegion, verify: bool) -> None:
        sha = hashlib.sha256()
        with mem.memoryview() as view, open(file, "rb", buffering=0) as f:
            off = 0
            while off < region.size:
                n = f.readinto(view[off : off + _CHUNK])
                if not n:
                    raise SnapshotError(f"snapshot memory file {file} ended early")
                if verify:
                    sha.update(view[off : off + n])
                off += n
        if verify and sha.hexdigest() != region.sha256:
            raise SnapshotError(
                f"snapshot memory file {file} does not match its checksum",
                hint="the snapshot is corrupted",
            )

    def restore_state(self, vm: Vm) -> list[Vcpu]:
        """Put the VM state, then each vCPU's, into ``vm``, creating the vCPUs that do not
        exist yet.  ``vm`` must already have the irqchip/PIT the snapshot had."""
        try:
            vm.restore_state(self.manifest.vm)
            have = {c.index: c for c in vm.vcpus}
            cpus = []
            for state in self.manifest.vcpus:
                cpu = have.get(state.index) or vm.create_vcpu(state.index)
                cpu.restore_state(state)
                cpus.append(cpu)
            return cpus
        except KvmError as exc:
            raise SnapshotError(f"cannot restore the snapshot's state: {exc}") from exc
