"""kvmkit's guest programs: the ABI they speak and a cached builder.

The guests are tiny freestanding x86 kernels in ``csrc/guests/`` (C plus an assembly entry)
that boot as multiboot v1 images, both under kvmkit's runner and under
``qemu-system-x86_64 -kernel``.  :func:`build_guest` compiles one with the system gcc and
binutils into a cache keyed by the sources and the toolchain, so the first call builds and
later calls return at once.

The constants below mirror ``csrc/guests/kvmkit_guest.h``, which documents the ABI in full:

- console: ``outb`` to :data:`PORT_DEBUGCON` (QEMU ``isa-debugcon``);
- exit: ``outl`` of *v* to :data:`PORT_EXIT` (QEMU ``isa-debug-exit``, whose process exits
  with ``(v << 1) | 1``; the kvmkit runner exits with *v*);
- hypercalls: ``outl`` to ``HYPERCALL_BASE + nr`` of the 32-bit guest-physical address of an
  argument struct of little-endian u64 fields: ``HC_TIME {nsecs (out)}``,
  ``HC_PUTS {data_gpa, len}``, ``HC_EXIT {code}``, ``HC_MARK {label_gpa, label_len}``;
- fw_cfg: 16-bit selector writes to :data:`PORT_FW_CFG_SELECTOR`, byte reads from
  :data:`PORT_FW_CFG_DATA`; keys :data:`FW_CFG_NB_CPUS` (u16) and :data:`FW_CFG_RAM_SIZE`
  (u64);
- pvio sends bytes through the UART at :data:`PORT_COM1` and through the paravirtual
  ring at :data:`PVRING_ADDR` (set up at :data:`PVRING_PORT`, doorbell
  :data:`PVRING_DOORBELL`: :mod:`kvmkit.runner.devices.pvring`);
- io-storm writes :data:`IO_STORM_PORT`; mmio-storm writes and reads
  :data:`MMIO_STORM_ADDR`; smp copies its real-mode AP trampoline to
  :data:`AP_TRAMPOLINE_ADDR` and drives the xAPIC at :data:`LAPIC_BASE`;
- an exception prints ``fault: vector N at RIP 0x...`` and exits with
  :data:`FAULT_EXIT_CODE`; interrupts (vectors :data:`IRQ_FIRST` to :data:`IDT_VECTORS` - 1)
  are taken only inside ``kk_wait_for_interrupt`` (``sti; hlt; cli``);
- timers, rtc, acpi, pci and testdev (QEMU's pc-testdev) drive the pc platform (LAPIC, PIC, PIT, IOAPIC at
  :data:`IOAPIC_BASE`, CMOS RTC, ACPI tables and PM timer, PCI configuration) and print
  checks that read the same under the kvmkit runner and QEMU's ``pc``;
- the command line is multiboot's (``"<image> key=value ..."``): ``n=``, ``cpl=0|3``,
  ``console=puts``, ``fault=ud|pf|gp|triple|user-ud|user-pf|user-gp``, ``testdev=1`` (pci).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

from kvmkit.errors import KvmkitError

__all__ = [
    "GUEST_NAMES",
    "GuestBuildError",
    "build_guest",
    "build_all_guests",
    "guest_source_dir",
    "guest_cache_dir",
    "qemu_exit_status",
]

# ---- the guest ABI (keep in step with csrc/guests/kvmkit_guest.h) ------------------------

PORT_DEBUGCON = 0xE9
PORT_EXIT = 0xF4
HYPERCALL_BASE = 0x500
HC_TIME = 1
HC_PUTS = 2
HC_EXIT = 3
HC_MARK = 4
PORT_FW_CFG_SELECTOR = 0x510
PORT_FW_CFG_DATA = 0x511
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NB_CPUS = 0x05
IO_STORM_PORT = 0x700
PORT_COM1 = 0x3F8
PVRING_PORT = 0x720
PVRING_DOORBELL = 0x724
PVRING_ADDR = 0x40_0000
PVRING_MAGIC = 0x474E_4952_5650_4B4B  # b"KKPVRING" little endian
MMIO_STORM_ADDR = 0xD000_0000
LAPIC_BASE = 0xFEE0_0000
AP_TRAMPOLINE_ADDR = 0x8000
#: SIPI vector that starts APs at :data:`AP_TRAMPOLINE_ADDR`.
AP_SIPI_VECTOR = AP_TRAMPOLINE_ADDR >> 12
#: An address the guests' page tables leave unmapped (``fault=pf`` touches it).
UNMAPPED_ADDR = 0x8000_0000
MAX_CPUS = 64
IOAPIC_BASE = 0xFEC0_0000
#: The guests' IDT: exceptions 0-31, interrupt vectors 32-63 (kk_set_irq_handler).
IDT_VECTORS = 64
IRQ_FIRST = 32
SPURIOUS_VECTOR = 0x3F
#: Where the images are linked and loaded (the multiboot convention).
LOAD_ADDR = 0x10_0000
#: The images, with their stacks and buffers, end below this (the linker script checks it).
IMAGE_END_MAX = 0x20_0000
#: Guest RAM the images need.
MIN_GUEST_RAM = 4 << 20
#: MARK hypercall labels every guest emits, in order (programs add their own in between,
#: and "user-mode" follows "main" when the work runs at CPL 3).
BOOT_MARKS: tuple[str, ...] = ("entry", "long-mode", "main", "done")
#: multiboot v1 handshake: the header magic in the image, the EAX value at entry.
MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_BOOT_MAGIC = 0x2BADB002

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_ARGUMENT = 2
FAULT_EXIT_CODE = 3

#: The programs, in the order a reader meets them.
GUEST_NAMES: tuple[str, ...] = (
    "hello",
    "compute",
    "io-storm",
    "mmio-storm",
    "smp",
    "timers",
    "rtc",
    "acpi",
    "pci",
    "testdev",
    "pvio",
    "vmexit",
    "flood",
    "dirty",
)

# ---- the builder ---------------------------------------------------------------------------

#: Files every guest links; the program itself is ``<name with - as _>.c``.
_COMMON_SOURCES = ("entry.S", "runtime.c")
_LINKER_SCRIPT = "linker.ld"
_CFLAGS = (
    "-std=gnu11",
    "-O2",
    "-Wall",
    "-Wextra",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-mcmodel=small",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-fno-stack-protector",
    # No endbr64 and no unwind tables: every CPL-0 instruction costs ~3 us on a PVM host.
    "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    # Keep gcc from turning runtime.c's memset/memcpy loops into calls to themselves.
    "-fno-tree-loop-distribute-patterns",
)
_LDFLAGS = (
    "-nostdlib",
    "-static",
    "-no-pie",
    "-Wl,--build-id=none",
    "-Wl,-z,max-page-size=0x1000",
    "-Wl,-z,noexecstack",
)
#: Bump when the build recipe changes in a way the hash of the inputs would not see.
_RECIPE_VERSION = "2"
_TOOL_TIMEOUT_S = 120.0


class GuestBuildError(KvmkitError):
    """A guest program could not be built; ``output`` holds the compiler's messages."""

    def __init__(self, message: str, *, output: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.output = output

    def __str__(self) -> str:
        text = super().__str__()
        if self.output:
            return f"{text}\n{self.output.rstrip()}"
        return text


def guest_source_dir() -> Path:
    """The directory holding the guest sources (``$KVMKIT_GUEST_SRC`` overrides it)."""
    override = os.environ.get("KVMKIT_GUEST_SRC")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "csrc" / "guests"


def guest_cache_dir() -> Path:
    """Root of the build cache: ``$KVMKIT_CACHE/guests``, else ``~/.cache/kvmkit/guests``."""
    root = os.environ.get("KVMKIT_CACHE")
    if root:
        return Path(root) / "guests"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "kvmkit" / "guests"


def qemu_exit_status(code: int) -> int:
    """The status QEMU's process exits with when a guest writes ``code`` to the exit port."""
    return ((code << 1) | 1) & 0xFF


def build_all_guests() -> dict[str, Path]:
    """Build (or find in the cache) every program in :data:`GUEST_NAMES`."""
    return {name: build_guest(name) for name in GUEST_NAMES}


def build_guest(name: str) -> Path:
    """Return the path of the multiboot ELF32 image of guest program ``name``.

    Builds it on first use with ``gcc``, ``ld`` and ``objcopy`` from PATH; later calls with
    unchanged sources and toolchain return the cached file without running anything (the
    key is remembered under the files' sizes and mtimes, see :func:`_cache_key`).  Safe to call from several threads or
    processes at once: each build happens in a private directory and is renamed into place.
    The caller must not modify the returned file.

    Raises :class:`GuestBuildError` for an unknown name, missing sources or tools, or a
    failed compile or link (with the tool's output).
    """
    if name not in GUEST_NAMES:
        raise GuestBuildError(
            f"unknown guest program {name!r}", hint=f"choose one of {', '.join(GUEST_NAMES)}"
        )
    src = guest_source_dir()
    sources = _source_files(src, name)
    key = _cache_key(src)
    out_dir = guest_cache_dir() / key
    image = out_dir / f"{name}.elf"
    if image.is_file():
        return image
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GuestBuildError(
            f"cannot create the guest cache directory {out_dir}: {exc.strerror}",
            hint="set KVMKIT_CACHE to a writable directory",
        ) from exc
    with tempfile.TemporaryDirectory(prefix=f".build-{name}-", dir=out_dir) as tmp:
        built = _compile_and_link(Path(tmp), src, sources, name)
        _check_image(built, name)
        os.replace(built, image)
    return image


def _source_files(src: Path, name: str) -> list[Path]:
    files = [src / f for f in (*_COMMON_SOURCES, f"{name.replace('-', '_')}.c")]
    missing = [str(f) for f in files + [src / _LINKER_SCRIPT] if not f.is_file()]
    if missing:
        raise GuestBuildError(
            f"guest sources missing: {', '.join(missing)}",
            hint="run from a kvmkit source checkout or set KVMKIT_GUEST_SRC to csrc/guests",
        )
    return files


def _cache_key(src: Path) -> str:
    """The build's key: a hash of every file in the source dir, the flags and the
    toolchain's versions.  Hashing the sources and asking gcc, ld and objcopy for their
    versions costs ~15 ms per run, so the key is remembered under a stamp of what it was
    computed from (paths, sizes and mtimes of the sources and of the tools' binaries) and
    computed again only when one of them changed."""
    stamp = _stamp(src)
    memo_path = guest_cache_dir() / _KEY_MEMO
    memo = _read_memo(memo_path)
    key = memo.get(stamp)
    if isinstance(key, str):
        return key
    key = _hash_key(src, _toolchain_id())
    memo.pop(stamp, None)
    memo[stamp] = key
    _write_memo(memo_path, dict(list(memo.items())[-_KEY_MEMO_ENTRIES:]))
    return key


#: The key memo in the cache directory, and how many stamps it keeps (newest last).
_KEY_MEMO = "keys.json"
_KEY_MEMO_ENTRIES = 32


def _stamp(src: Path) -> str:
    """What the key depends on, cheaply: the recipe, and path, size and mtime of every
    source file and of each tool's binary.  Raises GuestBuildError for a missing tool."""
    parts = [_RECIPE_VERSION, str(src.resolve())]
    for tool in _TOOLS:
        found = shutil.which(tool)
        if found is None:
            raise _missing_tool(tool)
        real = os.path.realpath(found)
        st = os.stat(real)
        parts.append(f"{tool}={real}:{st.st_size}:{st.st_mtime_ns}")
    for source in sorted(p for p in src.iterdir() if p.is_file()):
        st = source.stat()
        parts.append(f"{source.name}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts)


def _read_memo(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_memo(path: Path, memo: dict[str, object]) -> None:
    """Best effort (the memo only saves time): a private temp file renamed into place."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".keys-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(memo, f)
        os.replace(tmp, path)
    except OSError:
        pass


def _hash_key(src: Path, toolchain: str) -> str:
    """Hash of every file in the source dir, the flags and the toolchain's versions."""
    import hashlib  # only when the sources or tools changed (loading OpenSSL costs ms)

    h = hashlib.sha256()
    for item in (_RECIPE_VERSION, toolchain, *_CFLAGS, *_LDFLAGS):
        h.update(item.encode() + b"\0")
    for path in sorted(p for p in src.iterdir() if p.is_file()):
        h.update(path.name.encode() + b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


_TOOLS = ("gcc", "ld", "objcopy")


def _missing_tool(tool: str) -> GuestBuildError:
    return GuestBuildError(
        f"{tool} not found on PATH; kvmkit builds its guest programs with it",
        hint="install gcc and binutils (Debian/Ubuntu: apt-get install gcc binutils)",
    )


@functools.cache
def _toolchain_id() -> str:
    """First line of ``--version`` of gcc, ld and objcopy: part of the cache key."""
    lines = []
    for tool in _TOOLS:
        path = shutil.which(tool)
        if path is None:
            raise _missing_tool(tool)
        result = _run([path, "--version"], what=f"{tool} --version")
        lines.append(result.splitlines()[0] if result else tool)
    return "\n".join(lines)


def _run(cmd: list[str], *, what: str, cwd: Path | None = None) -> str:
    import subprocess  # only to build (a cached image needs no tool; saves ~2 ms a run)

    try:
        proc = subprocess.run(
            cmd,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=_TOOL_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise GuestBuildError(
            f"{what} did not finish within {_TOOL_TIMEOUT_S:.0f} s", output=str(exc.stderr or "")
        ) from exc
    except OSError as exc:
        raise GuestBuildError(f"cannot run {cmd[0]}: {exc.strerror}") from exc
    if proc.returncode != 0:
        raise GuestBuildError(
            f"{what} failed with exit status {proc.returncode}",
            output=(proc.stdout + proc.stderr),
            hint="the compiler's output follows",
        )
    return proc.stdout


def _compile_and_link(tmp: Path, src: Path, sources: list[Path], name: str) -> Path:
    objects = []
    for source in sources:
        obj = tmp / (source.name + ".o")
        _run(
            ["gcc", *_CFLAGS, f"-I{src}", "-c", str(source), "-o", str(obj)],
            what=f"compiling {source.name} for guest {name!r}",
        )
        objects.append(str(obj))
    elf64 = tmp / f"{name}.elf64"
    _run(
        ["gcc", *_LDFLAGS, f"-Wl,-T,{src / _LINKER_SCRIPT}", *objects, "-o", str(elf64)],
        what=f"linking guest {name!r}",
    )
    # QEMU's multiboot loader refuses ELF64; the same bytes in an ELF32 container load fine.
    elf32 = tmp / f"{name}.elf"
    _run(
        ["objcopy", "-O", "elf32-i386", str(elf64), str(elf32)],
        what=f"converting guest {name!r} to ELF32",
    )
    return elf32


def _check_image(path: Path, name: str) -> None:
    """The result is an ELF32 with the multiboot header where loaders look for it."""
    data = path.read_bytes()
    head = data[:8192]
    magic = MULTIBOOT_HEADER_MAGIC.to_bytes(4, "little")
    if data[:5] != b"\x7fELF\x01" or magic not in head:
        raise GuestBuildError(
            f"guest {name!r} built, but {path.name} is not a multiboot ELF32 image",
            hint="check csrc/guests/linker.ld: the .multiboot section must come first",
        )


def _main() -> int:
    """``python -m kvmkit.guests``: build every guest and print ``name<TAB>path`` lines."""
    import sys

    try:
        images = build_all_guests()
    except GuestBuildError as exc:
        print(f"kvmkit.guests: error: {exc}", file=sys.stderr)
        return exc.exit_status
    for guest, image_path in images.items():
        print(f"{guest}\t{image_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
