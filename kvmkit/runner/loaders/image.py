"""What a loader produces: the pieces of an image and where they go, and the checks every
kind of image must pass before anything is written into guest memory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmkit.kvm.modes import Mode
from kvmkit.runner.errors import ImageError, RunnerError


@dataclass(frozen=True)
class Segment:
    """One piece of the image: ``data`` goes to guest-physical ``addr``, and the
    ``memsz - len(data)`` bytes after it are zeroed (BSS)."""

    addr: int
    data: bytes
    memsz: int

    def __post_init__(self) -> None:
        if self.memsz < len(self.data):
            raise RunnerError(
                f"segment at {self.addr:#x}: memsz {self.memsz:#x} is smaller than its "
                f"{len(self.data):#x} bytes of data"
            )

    @property
    def end(self) -> int:
        """First guest-physical address past the segment (data and BSS)."""
        return self.addr + self.memsz

    def describe(self) -> str:
        return f"{self.addr:#x}-{self.end - 1:#x}" if self.memsz else f"{self.addr:#x} (empty)"


@dataclass(frozen=True)
class MultibootHeader:
    """A multiboot v1 header as found in the image.

    The ``*_addr`` fields are the a.out-kludge addresses, ``None`` unless flag bit 16 is set.
    ``wants_video`` (bit 2) is recorded but not honoured: like QEMU's ``-kernel`` (which
    prints "multiboot knows VBE. we don't"), kvmkit sets no video mode and passes no
    framebuffer information; the runner may tell the user so.
    """

    flags: int
    header_addr: int | None
    load_addr: int | None
    load_end_addr: int | None
    bss_end_addr: int | None
    entry_addr: int | None
    wants_mem_info: bool
    wants_page_align: bool
    wants_video: bool
    #: File offset of the header's magic (not part of the published API, but handy in messages).
    offset: int = 0


@dataclass(frozen=True)
class LoadedImage:
    """A validated guest image, ready for :func:`place`.

    ``mode`` is the CPU mode the image must start in: ``PROTECTED`` for multiboot and
    ELF32, ``LONG`` for ELF64, the mode asked for with a flat binary.
    """

    path: Path
    kind: str  # "flat" | "elf32" | "elf64" | "multiboot"
    entry: int
    mode: Mode
    segments: tuple[Segment, ...]
    multiboot: MultibootHeader | None = None

    @property
    def end(self) -> int:
        """Highest ``addr + memsz`` of any segment."""
        return max((s.end for s in self.segments), default=0)


def check_reserved(reserved: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Validate the caller's reserved ranges: each is a half-open ``(start, end)``."""
    ranges = []
    for item in reserved:
        start, end = (int(x) for x in item)
        if start < 0 or end <= start:
            raise RunnerError(
                f"reserved range ({start:#x}, {end:#x}) is invalid: give (start, end) with "
                "end > start, end exclusive"
            )
        ranges.append((start, end))
    return ranges


def check_layout(
    path: Path,
    segments: Sequence[Segment],
    entry: int,
    *,
    ram_size: int,
    reserved: Sequence[tuple[int, int]] = (),
) -> None:
    """Raise :class:`ImageError` unless every segment lies in guest RAM ``[0, ram_size)``,
    outside the reserved ranges and apart from the others, and ``entry`` lies in one."""
    loaded = [s for s in segments if s.memsz > 0]
    if not loaded:
        raise ImageError(path, "no loadable segments (nothing with a non-zero memory size)")
    for seg in loaded:
        if seg.addr < 0 or seg.end > ram_size:
            raise ImageError(
                path,
                f"segment {seg.describe()} lies outside guest RAM [0, {ram_size:#x}) "
                "(give the guest more memory or link the image lower)",
            )
        for start, end in reserved:
            if seg.addr < end and start < seg.end:
                raise ImageError(
                    path,
                    f"segment {seg.describe()} overlaps the range {start:#x}-{end - 1:#x} "
                    "the runner reserves for its own tables",
                )
    ordered = sorted(loaded, key=lambda s: s.addr)
    for low, high in zip(ordered, ordered[1:], strict=False):
        if high.addr < low.end:
            raise ImageError(path, f"segments {low.describe()} and {high.describe()} overlap")
    if not any(s.addr <= entry < s.end for s in loaded):
        spans = ", ".join(s.describe() for s in ordered)
        raise ImageError(path, f"entry point {entry:#x} is outside every segment ({spans})")
