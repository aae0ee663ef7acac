"""Guest memory: guest-physical addresses as their own type, and host mappings that back
KVM memory slots with bounds-checked access."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from kvmkit._ffi import ffi
from kvmkit.errors import ClosedError, GuestMemoryAccessError, MemoryLayoutError

PAGE_SIZE = 4096
HUGE_PAGE_SIZE = 2 * 1024 * 1024
_MAP_HUGETLB = 0x40000
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


class GuestAddress(int):
    """A guest-physical address.  An ``int`` (so arithmetic works), printed in hex, and
    a distinct type in signatures so guest and host addresses are not confused."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"GuestAddress({int(self):#x})"

    def __str__(self) -> str:
        return f"{int(self):#x}"

    def __add__(self, other: int) -> GuestAddress:
        return GuestAddress(int(self) + int(other))


def hugepages_available() -> bool:
    """True when the host has free explicit 2 MiB huge pages (``HugePages_Free`` > 0)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1]) > 0
    except OSError:
        pass
    return False


def _map_private(path: Path, size: int) -> mmap.mmap:
    """``size`` bytes of ``path`` mapped ``MAP_PRIVATE``: pages fault in from the file as
    the guest touches them, writes go to private copies and never reach the file.

    The file is opened read-only and must hold at least ``size`` bytes (a shorter file
    would turn a guest access past its end into SIGBUS); it is never extended."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise MemoryLayoutError(f"cannot open memory file {path}: {exc.strerror}") from exc
    try:
        have = os.fstat(fd).st_size
        if have < size:
            raise MemoryLayoutError(f"memory file {path} has {have} bytes; the region needs {size}")
        return mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


class GuestMemory:
    """One contiguous range of guest-physical memory backed by a host mapping.

    Created by :meth:`kvmkit.kvm.Vm.add_memory`; the VM owns it and unmaps it when the
    region is removed or the VM closes.  Addresses given to :meth:`read` and
    :meth:`write` are guest-physical (absolute), and every access is bounds-checked.
    """

    def __init__(
        self,
        guest_phys: int,
        size: int,
        *,
        slot: int,
        readonly: bool = False,
        log_dirty: bool = False,
        backing: str | os.PathLike[str] | None = None,
        hugepages: bool = False,
        private: bool = False,
    ) -> None:
        self.guest_phys = GuestAddress(guest_phys)
        self.size = size
        self.slot = slot
        self.readonly = readonly
        self.log_dirty = log_dirty
        self.backing = Path(backing) if backing is not None else None
        self.hugepages = hugepages
        self.private = private
        if private:
            if self.backing is None:
                raise MemoryLayoutError("private=True maps a backing file; name one")
            self._map = _map_private(self.backing, size)
        else:
            self._map = self._make_mapping(size, self.backing, hugepages)
        ptr = ffi.from_buffer(self._map)
        self.host_address: int = int(ffi.cast("uintptr_t", ptr))
        ffi.release(ptr)
        self._view: memoryview | None = memoryview(self._map)

    @staticmethod
    def _make_mapping(size: int, backing: Path | None, hugepages: bool) -> mmap.mmap:
        if backing is not None:
            try:
                fd = os.open(backing, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                raise MemoryLayoutError(
                    f"cannot open memory backing file {backing}: {exc.strerror}"
                ) from exc
            try:
                if os.fstat(fd).st_size < size:
                    os.ftruncate(fd, size)
                return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
        flags = mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        if hugepages and hugepages_available():
            try:
                return mmap.mmap(-1, size, flags | _MAP_HUGETLB, mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError:
                pass  # fall back to transparent huge pages below
        mapping = mmap.mmap(-1, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
        if hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                mapping.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass
        return mapping

    @property
    def end(self) -> GuestAddress:
        """First guest-physical address past this region."""
        return GuestAddress(self.guest_phys + self.size)

    @property
    def closed(self) -> bool:
        return self._view is None

    def contains(self, addr: int, length: int = 1) -> bool:
        return self.guest_phys <= addr and addr + length <= self.guest_phys + self.size

    def _offset(self, addr: int, length: int) -> int:
        if self._view is None:
            raise ClosedError(
                f"guest memory at {self.guest_phys} is closed (its region was removed)"
            )
        if length < 0 or not self.contains(addr, length):
            raise GuestMemoryAccessError(
                f"access of {length} bytes at {int(addr):#x} is outside guest memory "
                f"{int(self.guest_phys):#x}-{int(self.end) - 1:#x}"
            )
        return int(addr) - self.guest_phys

    def read(self, addr: int, length: int) -> bytes:
        """Copy ``length`` bytes starting at guest-physical ``addr``."""
        off = self._offset(addr, length)
        assert self._view is not None
        return bytes(self._view[off : off + length])

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest memory at guest-physical ``addr``."""
        off = self._offset(addr, len(data))
        assert self._view is not None
        self._view[off : off + len(data)] = data

    def read_u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def write_u64(self, addr: int, value: int) -> None:
        self.write(addr, value.to_bytes(8, "little"))

    def memoryview(self) -> memoryview:
        """A zero-copy view of the whole region (index 0 is ``guest_phys``).

        The caller must release it (``view.release()`` or a ``with`` block) before the
        region is removed; a view still held then keeps the host mapping alive.
        """
        if self._view is None:
            raise ClosedError(f"guest memory at {self.guest_phys} is closed")
        return self._view[:]

    def close(self) -> None:
        """Unmap.  Called by the VM after KVM no longer uses the slot; idempotent."""
        if self._view is None:
            return
        self._view.release()
        self._view = None
        try:
            self._map.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes when that view does

    def __repr__(self) -> str:
        flags = [n for n, on in (("readonly", self.readonly), ("log_dirty", self.log_dirty)) if on]
        return (
            f"<GuestMemory slot={self.slot} {int(self.guest_phys):#x}-{int(self.end) - 1:#x} "
            f"{self.size // 1024} KiB{' ' + ','.join(flags) if flags else ''}>"
        )
