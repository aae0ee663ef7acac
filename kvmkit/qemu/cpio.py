"""A minimal writer for the cpio "newc" format, the format the Linux kernel unpacks as an
initramfs (``Documentation/driver-api/early-userspace/buffer-format.rst``).

Only what an initramfs needs: directories, regular files, symlinks and character device
nodes, all owned by root.  The caller lists parents before children.
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass
from pathlib import Path

_MAGIC = b"070701"


@dataclass(frozen=True)
class Entry:
    """One archive member.  ``name`` is relative (no leading ``/``)."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def directory(name: str, perm: int = 0o755) -> Entry:
    return Entry(name, stat.S_IFDIR | perm)


def file(name: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(name, stat.S_IFREG | perm, data)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, stat.S_IFLNK | 0o777, target.encode())


def chardev(name: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(name, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, entry: Entry, namesize: int) -> bytes:
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        2 if stat.S_ISDIR(entry.mode) else 1,  # nlink
        0,  # mtime: fixed so that builds are reproducible
        len(entry.data),
        0,  # dev major
        0,  # dev minor
        entry.rdev[0],
        entry.rdev[1],
        namesize,
        0,  # check
    )
    return _MAGIC + b"".join(b"%08X" % f for f in fields)


def pack(entries: list[Entry]) -> bytes:
    """Return the uncompressed newc archive of ``entries`` followed by the trailer."""
    out = bytearray()
    for ino, entry in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
        name = entry.name.lstrip("/").encode() + b"\0"
        out += _header(ino if entry.name != "TRAILER!!!" else 0, entry, len(name))
        out += name
        out += _pad4(110 + len(name))
        out += entry.data
        out += _pad4(len(entry.data))
    return bytes(out)


def write_gzip(path: Path, entries: list[Entry]) -> None:
    """Write the archive of ``entries``, gzip-compressed, to ``path``."""
    path.write_bytes(gzip.compress(pack(entries), compresslevel=6, mtime=0))
