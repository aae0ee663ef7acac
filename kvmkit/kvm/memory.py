"""Guest memory: guest-physical addresses as their own type, and host mappings that back
KVM memory slots with bounds-checked access."""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
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


def _meminfo_kib(field: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def free_hugepages_bytes() -> int:
    """Bytes of free explicit huge pages of the default size (``HugePages_Free``)."""
    return _meminfo_kib("HugePages_Free") * _meminfo_kib("Hugepagesize") * 1024


def hugepages_available() -> bool:
    """True when the host has free explicit huge pages (``HugePages_Free`` > 0)."""
    return free_hugepages_bytes() > 0


def _mount_type(path: Path) -> str:
    """The file-system type of the mount holding ``path`` ("" when unknown)."""
    try:
        target = str(path.resolve())
        best, kind = "", ""
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            point = fields[1].replace("\\040", " ")
            if (target == point or target.startswith(point.rstrip("/") + "/")) and len(
                point
            ) >= len(best):
                best, kind = point, fields[2]
        return kind
    except (OSError, IndexError):
        return ""


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

    Backed as QEMU backs guest RAM: private anonymous memory marked
    ``MADV_HUGEPAGE`` (transparent huge pages; the kernel aligns mappings of whole 2 MiB
    multiples), or with ``hugepages`` explicit huge pages (``MAP_HUGETLB``, reserved
    up front: a :class:`MemoryLayoutError` when the host has too few free), or with
    ``backing`` a file (mapped shared) or a directory — QEMU's ``-mem-path`` — in which an
    unlinked file is made (on hugetlbfs: checked for enough free pages first).

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
        thp: bool = True,
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
        #: "thp" (anonymous, MADV_HUGEPAGE), "hugetlbfs", "file", "anonymous" or "private-file".
        self.backed_by: str
        if private:
            if self.backing is None:
                raise MemoryLayoutError("private=True maps a backing file; name one")
            self._map, self.backed_by = _map_private(self.backing, size), "private-file"
        else:
            self._map, self.backed_by = self._make_mapping(size, self.backing, hugepages, thp)
        ptr = ffi.from_buffer(self._map)
        self.host_address: int = int(ffi.cast("uintptr_t", ptr))
        ffi.release(ptr)
        self._view: memoryview | None = memoryview(self._map)

    @staticmethod
    def _make_mapping(
        size: int, backing: Path | None, hugepages: bool, thp: bool
    ) -> tuple[mmap.mmap, str]:
        """The host mapping and what backs it (see :attr:`GuestMemory.backed_by`)."""
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        if backing is not None and backing.is_dir():
            return _map_in_directory(size, backing), (
                "hugetlbfs" if _mount_type(backing) == "hugetlbfs" else "file"
            )
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
                return mmap.mmap(fd, size, mmap.MAP_SHARED, prot), "file"
            finally:
                os.close(fd)
        private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if hugepages:
            return _map_hugetlb(size), "hugetlbfs"
        mapping = mmap.mmap(-1, size, private | _MAP_NORESERVE, prot)
        if thp and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                mapping.madvise(mmap.MADV_HUGEPAGE)
                return mapping, "thp"
            except OSError:
                pass  # no THP in this kernel: small pages
        return mapping, "anonymous"

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
        # BufferError: a caller still holds a view; the mapping goes when that view does.
        with contextlib.suppress(BufferError):
            self._map.close()

    def __repr__(self) -> str:
        flags = [n for n, on in (("readonly", self.readonly), ("log_dirty", self.log_dirty)) if on]
        return (
            f"<GuestMemory slot={self.slot} {int(self.guest_phys):#x}-{int(self.end) - 1:#x} "
            f"{self.size // 1024} KiB{' ' + ','.join(flags) if flags else ''}>"
        )


def _map_hugetlb(size: int) -> mmap.mmap:
    page = _meminfo_kib("Hugepagesize") * 1024 or HUGE_PAGE_SIZE
    if size % page:
        raise MemoryLayoutError(
            f"{size >> 20} MiB is not a whole number of {page >> 20} MiB huge pages",
            hint="give the guest a multiple of the huge page size",
        )
    free = free_hugepages_bytes()
    if free < size:
        raise MemoryLayoutError(
            f"explicit huge pages: the guest needs {size // page} free {page >> 20} MiB "
            f"pages, the host has {free // page} (HugePages_Free in /proc/meminfo)",
            hint=f"reserve them with echo {size // page} > /proc/sys/vm/nr_hugepages, or drop "
            "--hugepages: transparent huge pages are the default",
        )
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_HUGETLB  # reserved now, not at fault
    try:
        return mmap.mmap(-1, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        raise MemoryLayoutError(
            f"cannot map {size >> 20} MiB of explicit huge pages: {exc.strerror}",
            hint="another process took the free huge pages; reserve more",
        ) from exc


def _map_in_directory(size: int, directory: Path) -> mmap.mmap:
    """QEMU's ``-mem-path DIR``: an unlinked file in ``directory``, mapped shared."""
    if _mount_type(directory) == "hugetlbfs":
        st = os.statvfs(directory)
        page, free = st.f_bsize, st.f_bavail * st.f_bsize
        if size % page:
            raise MemoryLayoutError(
                f"{size >> 20} MiB is not a whole number of the {page >> 20} MiB pages of "
                f"the hugetlbfs at {directory}"
            )
        if free < size:
            raise MemoryLayoutError(
                f"the hugetlbfs at {directory} has {free // page} free {page >> 20} MiB "
                f"pages, the guest needs {size // page}",
                hint=f"reserve them: echo {size // page} > /proc/sys/vm/nr_hugepages",
            )
    try:
        fd, name = tempfile.mkstemp(prefix="kvmkit-ram-", dir=directory)
    except OSError as exc:
        raise MemoryLayoutError(
            f"cannot create guest memory in {directory}: {exc.strerror}"
        ) from exc
    try:
        os.unlink(name)
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        raise MemoryLayoutError(
            f"cannot map {size >> 20} MiB of guest memory in {directory}: {exc.strerror}"
        ) from exc
    finally:
        os.close(fd)
