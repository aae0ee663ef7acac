"""``qemu-img`` as functions: create, info, convert and internal snapshots, with JSON
output parsed.  Thin (sparse) or thick images: ``preallocation`` ``off`` vs ``full``
(qcow2 also ``metadata``/``falloc``), as the seed does by hand.

Every image name is passed as an absolute path (:func:`_file`): qemu-img reads a name
like ``json:{...}`` or ``nbd:host`` as options or a protocol, and an absolute path
starts with ``/``, so it is always just a file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from kvmkit.qemu.errors import QemuImgError

QEMU_IMG = "qemu-img"
PREALLOCATION = ("off", "metadata", "falloc", "full")


def _run(args: list[str], *, timeout: float = 600) -> str:
    exe = shutil.which(QEMU_IMG)
    if exe is None:
        raise QemuImgError("qemu-img is not installed", hint="apt-get install qemu-utils")
    cmd = [exe, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise QemuImgError(f"{' '.join(cmd)} did not finish within {timeout:g} s") from exc
    if proc.returncode != 0:
        raise QemuImgError(
            f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr.strip()}"
        )
    return proc.stdout


def _size(size: int | str) -> str:
    return str(size)


def _file(path: str | Path) -> str:
    """``path`` as an absolute file name (never read as options or a protocol)."""
    return os.path.abspath(path)


def create(
    path: str | Path,
    size: int | str | None = None,
    *,
    fmt: str = "qcow2",
    backing: str | Path | None = None,
    backing_fmt: str | None = None,
    preallocation: str | None = None,
) -> dict[str, Any]:
    """Create an image (``size`` in bytes or with a suffix, e.g. ``"1G"``).  With
    ``backing``, a qcow2 overlay on that image (size defaults to the backing's).
    Returns :func:`info` of the new image."""
    args = ["create", "-q", "-f", fmt]
    if backing is not None:
        bfmt = backing_fmt or info(backing)["format"]
        args += ["-b", str(Path(_file(backing)).resolve()), "-F", bfmt]
    if preallocation:
        if preallocation not in PREALLOCATION:
            raise QemuImgError(
                f"unknown preallocation {preallocation!r}", hint=f"use one of {PREALLOCATION}"
            )
        args += ["-o", f"preallocation={preallocation}"]
    args.append(_file(path))
    if size is not None:
        args.append(_size(size))
    elif backing is None:
        raise QemuImgError("an image without a backing file needs a size")
    _run(args)
    return info(path)


def info(path: str | Path, *, backing_chain: bool = False) -> dict[str, Any]:
    """``qemu-img info --output=json``: format, virtual-size, actual-size, snapshots...
    With ``backing_chain``, the result has ``chain``: one entry per image."""
    args = ["info", "--output=json", "-U"]
    if backing_chain:
        args.append("--backing-chain")
    data = json.loads(_run([*args, _file(path)]))
    if backing_chain:
        return {**data[0], "chain": data}
    return dict(data)


def convert(
    source: str | Path,
    dest: str | Path,
    *,
    out_fmt: str = "qcow2",
    in_fmt: str | None = None,
    compress: bool = False,
) -> dict[str, Any]:
    """Copy ``source`` into a new standalone image ``dest`` (backing chain flattened)."""
    args = ["convert", "-O", out_fmt]
    if in_fmt:
        args += ["-f", in_fmt]
    if compress:
        args.append("-c")
    _run([*args, _file(source), _file(dest)])
    return info(dest)


def check(path: str | Path) -> dict[str, Any]:
    """``qemu-img check --output=json`` (qcow2 consistency)."""
    return dict(json.loads(_run(["check", "--output=json", "-U", _file(path)])))


def snapshot_create(path: str | Path, tag: str) -> None:
    """An internal (qcow2) snapshot of a disk that no running QEMU has open."""
    _run(["snapshot", "-c", tag, _file(path)])


def snapshot_apply(path: str | Path, tag: str) -> None:
    _run(["snapshot", "-a", tag, _file(path)])


def snapshot_delete(path: str | Path, tag: str) -> None:
    _run(["snapshot", "-d", tag, _file(path)])


def snapshot_list(path: str | Path) -> list[dict[str, Any]]:
    """The internal snapshots of ``path`` (``name``, ``vm-state-size``, ``date-sec``...)."""
    return list(info(path).get("snapshots", []))
