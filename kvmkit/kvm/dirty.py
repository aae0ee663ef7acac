"""Dirty-page tracking: the raw dirty bitmap as bytes, its decoding into pages and runs,
and the per-vCPU dirty ring (``KVM_CAP_DIRTY_LOG_RING``).

Two mechanisms, one per VM (KVM refuses ``KVM_GET_DIRTY_LOG`` once the ring is on):

- **bitmap**: a slot added with ``log_dirty=True``; ``Vm.get_dirty_bitmap(region)`` gives
  one bit per page (bit *n* of byte *n//8* = page *n*), cleared by the read unless the VM
  enabled ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``, in which case the caller clears (and
  re-protects) ranges with ``Vm.clear_dirty_log``.
- **ring**: ``Vm.enable_dirty_ring(entries)`` before any vCPU exists; each vCPU then
  pushes ``(slot, page offset)`` of every page it dirties into its own ring, mapped from
  the vCPU fd at ``KVM_DIRTY_LOG_PAGE_OFFSET``.  The collector :meth:`DirtyRing.harvest`s
  each ring then calls ``Vm.reset_dirty_rings()``, which re-protects the harvested pages.
  A vCPU whose ring is full exits with ``KVM_EXIT_DIRTY_RING_FULL``
  (:data:`EXIT_DIRTY_RING_FULL`) until the collector has harvested and reset.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

from kvmkit._ffi import lib
from kvmkit.errors import KvmError

PAGE_SIZE = 4096
EXIT_DIRTY_RING_FULL: int = lib.KVM_EXIT_DIRTY_RING_FULL
_GFN_DIRTY: int = lib.KVM_DIRTY_GFN_F_DIRTY
_GFN_RESET: int = lib.KVM_DIRTY_GFN_F_RESET
_RING_OFFSET = lib.KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE
_GFN_BYTES = 16  # struct kvm_dirty_gfn (tests/kvm/test_abi.py checks it)
_SKIP_BYTES = 512
_ZERO_CHUNK = bytes(_SKIP_BYTES)


def iter_dirty_pages(bitmap: bytes | bytearray | memoryview) -> Iterator[int]:
    """Page numbers (from the start of the slot) whose bit is set, ascending."""
    for first, count in iter_dirty_runs(bitmap):
        yield from range(first, first + count)


def iter_dirty_runs(bitmap: bytes | bytearray | memoryview) -> Iterator[tuple[int, int]]:
    """``(first page, page count)`` for each run of consecutive set bits, ascending.

    Clean stretches of 4096 pages are skipped with one C-level comparison, then each
    64-bit word is decoded with integer bit tricks: a 1 GiB bitmap (32 KiB) costs about
    4096 word steps when fully dirty and far less when mostly clean."""
    raw = bytes(bitmap)
    if len(raw) % 8:
        raw += bytes(8 - len(raw) % 8)
    words = memoryview(raw).cast("Q")
    pending_first, pending_len = -1, 0
    chunk = _SKIP_BYTES
    for base in range(0, len(raw), chunk):
        if raw[base : base + chunk] == _ZERO_CHUNK[: min(chunk, len(raw) - base)]:
            continue
        for w in range(base // 8, min(base + chunk, len(raw)) // 8):
            value = words[w]
            pos = w * 64
            while value:
                low = (value & -value).bit_length() - 1
                value >>= low
                pos += low
                ones = (~value & (value + 1)).bit_length() - 1
                if pending_len and pending_first + pending_len == pos:
                    pending_len += ones
                else:
                    if pending_len:
                        yield pending_first, pending_len
                    pending_first, pending_len = pos, ones
                value >>= ones
                pos += ones
    if pending_len:
        yield pending_first, pending_len


def count_dirty(bitmap: bytes | bytearray | memoryview) -> int:
    """Number of set bits."""
    return int.from_bytes(bitmap, "little").bit_count()


class DirtyRing:
    """One vCPU's dirty ring: ``entries`` ``struct kvm_dirty_gfn`` mapped shared from the
    vCPU fd.  Made by :meth:`Vcpu.dirty_ring`; one collector thread at a time."""

    def __init__(self, vcpu_fd: int, entries: int) -> None:
        self.entries = entries
        try:
            self._map = mmap.mmap(
                vcpu_fd,
                entries * _GFN_BYTES,
                mmap.MAP_SHARED,
                mmap.PROT_READ | mmap.PROT_WRITE,
                offset=_RING_OFFSET,
            )
        except OSError as exc:
            raise KvmError(f"cannot map the dirty ring of vCPU fd {vcpu_fd}: {exc}") from exc
        self._words: memoryview | None = memoryview(self._map).cast("Q")
        self._fetch = 0  # next entry to look at, free-running as KVM's fetch index

    def harvest(self) -> list[tuple[int, int]]:
        """``(slot, page offset in slot)`` of each entry KVM pushed since the last call,
        each marked for reset.  Call :meth:`Vm.reset_dirty_rings` afterwards."""
        words = self._words
        if words is None:
            raise KvmError("the dirty ring is closed")
        mask = self.entries - 1
        out: list[tuple[int, int]] = []
        fetch = self._fetch
        while True:
            i = (fetch & mask) * 2
            head = words[i]
            if not head & _GFN_DIRTY:
                break
            out.append((head >> 32, words[i + 1]))
            words[i] = (head & ~0xFFFFFFFF) | _GFN_RESET
            fetch += 1
        self._fetch = fetch
        return out

    def close(self) -> None:
        if self._words is not None:
            self._words.release()
            self._words = None
            self._map.close()
