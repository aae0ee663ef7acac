"""``kvmkit guest build|iso|info``: the Linux guest kit the QEMU half boots, and the
installer ISO built from it."""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvmkit.qemu import guestkit


@contextmanager
def _progress(quiet: bool, what: str) -> Iterator[guestkit.Progress | None]:
    """Steps of a kit or ISO build as one rich progress bar (``None`` when quiet)."""
    if quiet:
        yield None
        return
    from kvmkit.ui import progress

    with progress(what) as advance:
        done_before = [0]

        def show(step: str, done: int, total: int) -> None:
            advance(
                done - done_before[0], description=f"{what}: {step} {done}/{total}", total=total
            )
            done_before[0] = done

        yield show


def _describe(kit: guestkit.GuestKit) -> dict[str, Any]:
    return {
        "kernel_version": kit.kernel_version,
        "directory": str(kit.directory),
        "kernel": str(kit.kernel),
        "boots_pvh": kit.boots_pvh,
        "initrd": str(kit.initrd),
        "modules": list(kit.modules),
        "append": kit.append,
        "source": kit.source,
        "built_at": datetime.datetime.fromtimestamp(kit.built_at).isoformat(timespec="seconds"),
        "size_mib": round(kit.size_bytes / 2**20, 1),
    }


def _build(args: argparse.Namespace) -> int:
    from kvmkit.qemu import guestkit

    with _progress(args.quiet, "guest kit") as progress:
        kit = guestkit.build_kit(
            args.kernel_version,
            kernel_image=Path(args.kernel) if args.kernel else None,
            modules_dir=Path(args.modules) if args.modules else None,
            force=args.force,
            progress=progress,
        )
    boot = "PVH ELF (fast boot)" if kit.boots_pvh else "bzImage"
    print(f"guest kit {kit.kernel_version} ready in {kit.directory} (boots {boot})")
    return 0


def _iso(args: argparse.Namespace) -> int:
    from kvmkit.qemu import installer

    with _progress(args.quiet, "installer ISO") as progress:
        out = installer.build_iso(Path(args.out), args.kernel_version, progress=progress)
    size = out.stat().st_size / 2**20
    print(
        f"installer ISO {out} ({size:.1f} MiB); install with `kvmkit vm create NAME "
        f"--cdrom {out} --disk size=1G,format=qcow2`"
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    from kvmkit.qemu import guestkit

    kits = guestkit.cached_kits()
    if args.json:
        print(json.dumps({"cache": str(guestkit.kits_dir()), "kits": [_describe(k) for k in kits]}))
        return 0
    print(f"cache: {guestkit.kits_dir()}")
    if not kits:
        print("no guest kit cached; build one with `kvmkit guest build`")
        return 0
    for kit in kits:
        d = _describe(kit)
        print(
            f"{d['kernel_version']}: {d['size_mib']} MiB, built {d['built_at']}, from {d['source']}"
        )
        print(f"  kernel  {d['kernel']}{'  (PVH)' if kit.boots_pvh else ''}")
        print(f"  initrd  {d['initrd']}")
        print(f"  modules {' '.join(kit.modules)}")
        print(f"  append  {kit.append}")
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("guest", help="build or show the Linux guest kit for QEMU")
    sub = parser.add_subparsers(dest="guest_command", metavar="ACTION", required=True)

    build = sub.add_parser("build", help="fetch a Debian kernel and build the guest kit")
    build.add_argument(
        "kernel_version", nargs="?", help="kernel release, e.g. 6.1.0-56-amd64 (default: apt's)"
    )
    build.add_argument("--kernel", help="use this kernel image instead of a Debian package")
    build.add_argument("--modules", help="module tree (lib/modules/<ver>) of --kernel")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.add_argument("--quiet", action="store_true", help="no progress display")
    build.set_defaults(func=_build)

    iso = sub.add_parser("iso", help="build kvmkit's installer ISO (for `kvmkit vm create`)")
    iso.add_argument("out", help="the ISO file to write")
    iso.add_argument(
        "--kernel-version", help="Debian kernel release (default: the guest kit's, else apt's)"
    )
    iso.add_argument("--quiet", action="store_true", help="no progress display")
    iso.set_defaults(func=_iso)

    info = sub.add_parser("info", help="show the cached guest kits")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_info)
