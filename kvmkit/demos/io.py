"""Demo step ``io``: the same bytes through an emulated device and through a paravirtual
one, twice.

1. In the kvmkit runner, where every exit is counted (``RunStats``): the ``pvio`` guest,
   at CPL 3, sends a pseudo-random stream through the 8250 UART at 0x3f8, one ``outb``
   per byte (full emulation: each byte is an exit that the VMM answers as the UART's
   transmit register), and then through the pvring (:mod:`kvmkit.runner.devices.pvring`):
   a ring in guest RAM filled a batch at a time, each batch announced by one write to a
   doorbell port that is a ``KVM_IOEVENTFD``, so the kernel wakes the VMM's consumer
   thread and the vCPU runs on with no exit.  Both sides compute CRC-32 of the stream and
   the step checks they agree.  Each way is a separate run; its exits minus those of a
   baseline run of the same guest that sends nothing (``phase=none``) are the transfer's
   exits.  Its time is between the guest's ``xfer-start`` and ``xfer-end`` marks.  The
   ring is also run with the ioeventfd left out (the doorbell then exits, one exit per
   batch), which shows what the ioeventfd saves.
2. Under QEMU with the Linux guest kit on the ``pc`` machine: ``dd`` with
   ``oflag=direct`` to an emulated IDE disk (PIIX3 IDE, the ``ata_piix`` driver) and to
   a virtio-blk disk, both fresh qcow2 images of the same size on the same host
   directory; MiB/s from the host's clock around each ``dd``, and QEMU's own block
   statistics over QMP (``query-blockstats``: write operations, bytes, time).

The UART run is sized to a time budget: a 16 KiB probe gives the cost of one byte and
the real run sends as much as fits (at most 1 MiB); exits per KiB do not depend on the
size.  Under TCG, the disk writes are smaller than 64 MiB where needed to keep the step
short; the output says so.
"""

from __future__ import annotations

import re
import tempfile
import time
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvmkit.runner.context import Console
from kvmkit.sizes import format_size

KiB = 1 << 10
MiB = 1 << 20
RING_BATCHES = (64, 1 * KiB, 16 * KiB, 64 * KiB)
#: The ring run whose doorbell exits (no ioeventfd), at this batch size.
EXITING_DOORBELL_BATCH = 4 * KiB
UART_PROBE = 16 * KiB
UART_MAX = 1 * MiB
RUN_TIMEOUT_S = 300.0
DISK_MIB = 64
DISK_MIB_TCG_QUICK = 8
DD_BLOCK = "1M"

EXPLANATION = (
    "Full virtualization emulates a device register by register: every byte a guest "
    "writes to an emulated UART leaves the CPU and is answered by the VMM. A paravirtual "
    "guest knows it is virtual and talks to the host through shared memory, ringing a "
    "doorbell once per batch. We count the exits of both in kvmkit's runner, then time a "
    "Linux guest writing to an emulated IDE disk and to a virtio-blk disk under QEMU."
)

Say = Callable[[str], None]
Task = Callable[[str], AbstractContextManager[Any]]
_CRC = re.compile(r"pvio: (\w+) (\d+) bytes crc32 (0x[0-9a-f]+)")


class IoStepError(RuntimeError):
    """A transfer gave wrong data or the guest did not finish."""


@dataclass
class Transfer:
    """One way of sending ``bytes`` bytes, as counted in one run."""

    way: str  # "UART" | "pvring" | "pvring, doorbell exits"
    kind: str  # "emulated" | "paravirtual"
    bytes: int
    batch: int | None
    exits: int  # transfer's exits: the run's minus the baseline run's
    device_exits: int  # exits on the device's own ports
    seconds: float
    doorbells: int = 0
    checksum_ok: bool = False
    exits_by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.way if self.batch is None else f"{self.way}, {_size(self.batch)}/doorbell"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["label"] = self.label
        out["exits_per_kib"] = self.exits / (self.bytes / KiB)
        out["mib_per_s"] = self.bytes / MiB / self.seconds if self.seconds > 0 else None
        return out


def _size(n: int) -> str:
    """``format_size`` spelt for people: 64 B, 1 KiB, 1 MiB."""
    text = format_size(n)
    return f"{text[:-1]} {text[-1]}iB" if text[-1] in "KMGTPE" else f"{n} B"


# ---- the kvmkit runner --------------------------------------------------------------------


def _run_pvio(image: Path, append: str, port_devices: list[Any]) -> Any:
    from kvmkit.runner.machine import RunConfig, run_guest

    result = run_guest(
        RunConfig(
            image=image,
            echo=None,
            append=f"console=puts {append}",
            timeout=RUN_TIMEOUT_S,
            port_devices=port_devices,
            mem_size=16 * MiB,
        )
    )
    if result.reason != "exit" or result.exit_code != 0:
        raise IoStepError(
            f"pvio {append}: {result.reason} {result.exit_code} {result.detail}: "
            f"{result.console.strip()[-300:]}"
        )
    return result


def _xfer_seconds(result: Any) -> float:
    marks = {m.label: m.t_s for m in result.stats.marks}
    return float(marks["xfer-end"] - marks["xfer-start"])


def _guest_crc(result: Any) -> int:
    found = _CRC.search(result.console)
    if found is None:
        raise IoStepError(f"pvio printed no checksum: {result.console.strip()[-200:]}")
    return int(found.group(3), 16)


def uart_transfer(image: Path, n: int, baseline: int) -> Transfer:
    """``n`` bytes through the UART, whose output goes to a :class:`_Wire` (so the bytes
    can be checked without keeping them)."""
    from kvmkit.runner.devices.uart import COM1_PORT, Uart8250

    wire = _Wire()
    devices = [(COM1_PORT, 8, lambda ctx: Uart8250(wire, irq=ctx.irq))]
    result = _run_pvio(image, f"phase=uart n={n}", devices)
    return Transfer(
        way="UART",
        kind="emulated",
        bytes=n,
        batch=None,
        exits=result.stats.total_exits - baseline,
        device_exits=sum(result.stats.ports[p] for p in range(COM1_PORT, COM1_PORT + 8)),
        seconds=_xfer_seconds(result),
        checksum_ok=wire.total == n and wire.crc == _guest_crc(result),
        exits_by_kind=dict(result.stats.exits),
    )


class _Wire(Console):
    """The far end of the UART's line: counts the bytes and their CRC-32, keeps none."""

    def __init__(self) -> None:
        super().__init__(None, limit=0)
        self.crc = 0

    def write(self, data: bytes) -> None:
        self.total += len(data)
        self.crc = zlib.crc32(data, self.crc)


def ring_transfer(
    image: Path, n: int, batch: int, baseline: int, *, ioeventfd: bool = True
) -> Transfer:
    """``n`` bytes through the pvring, ``batch`` bytes per doorbell."""
    from kvmkit.runner.devices.pvring import PVRING_DOORBELL, PVRING_PORT, pvring_port_device

    made: list[Any] = []
    ring = max(128 * KiB, batch)
    result = _run_pvio(
        image,
        f"phase=ring n={n} batch={batch} ring={ring}",
        [pvring_port_device(made, use_ioeventfd=ioeventfd)],
    )
    stats = made[-1].stats()
    if stats["error"]:
        raise IoStepError(f"pvring: {stats['error']}")
    ok = stats["consumed"] == n and stats["checksum"] == _guest_crc(result)
    return Transfer(
        way="pvring" if ioeventfd else "pvring, doorbell exits",
        kind="paravirtual",
        bytes=n,
        batch=batch,
        exits=result.stats.total_exits - baseline,
        device_exits=result.stats.ports[PVRING_PORT] + result.stats.ports[PVRING_DOORBELL],
        seconds=_xfer_seconds(result),
        doorbells=-(-n // batch),
        checksum_ok=ok,
        exits_by_kind=dict(result.stats.exits),
    )


def measure_runner(
    *, uart_budget_s: float, ring_bytes: int, batches: tuple[int, ...] = RING_BATCHES
) -> tuple[list[Transfer], dict[str, Any]]:
    """Every transfer in the runner, and notes (baseline exits, how the UART was sized)."""
    from kvmkit.guests import build_guest

    image = build_guest("pvio")
    baseline = _run_pvio(image, "phase=none", []).stats.total_exits
    probe = uart_transfer(image, UART_PROBE, baseline)
    per_byte = probe.seconds / probe.bytes
    n = max(UART_PROBE, min(UART_MAX, int(uart_budget_s / per_byte) // KiB * KiB))
    uart = probe if n == UART_PROBE else uart_transfer(image, n, baseline)
    transfers = [uart]
    for batch in batches:
        transfers.append(ring_transfer(image, ring_bytes, batch, baseline))
    transfers.append(
        ring_transfer(image, ring_bytes, EXITING_DOORBELL_BATCH, baseline, ioeventfd=False)
    )
    bad = [t.label for t in transfers if not t.checksum_ok]
    if bad:
        raise IoStepError(f"the data did not arrive intact: {', '.join(bad)}")
    notes = {
        "baseline_exits": baseline,
        "uart_probe_bytes": UART_PROBE,
        "uart_us_per_byte": per_byte * 1e6,
        "uart_bytes": n,
        "uart_1mib_estimate_s": per_byte * MiB,
    }
    return transfers, notes


# ---- QEMU: IDE beside virtio-blk --------------------------------------------------------------


@dataclass
class DiskWrite:
    disk: str  # "IDE (emulated)" | "virtio-blk (paravirtual)"
    kind: str
    guest_device: str
    pass_index: int
    mib: int
    seconds: float
    wr_operations: int
    wr_bytes: int
    wr_total_time_ns: int
    dd_report: str

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["mib_per_s"] = self.mib / self.seconds if self.seconds > 0 else None
        return out


async def _blockstats(qmp: Any) -> dict[str, dict[str, int]]:
    """Write statistics per block node name (the drive's format node)."""
    out = {}
    for entry in await qmp.execute("query-blockstats"):
        node = entry.get("node-name") or entry.get("device") or ""
        stats = entry["stats"]
        out[node] = {k: int(stats[k]) for k in ("wr_operations", "wr_bytes", "wr_total_time_ns")}
    return out


async def measure_disks(
    mib: int, *, say: Say, passes: int = 1
) -> tuple[list[DiskWrite], dict[str, Any]]:
    """Boot the guest kit with an IDE and a virtio-blk disk (qcow2 each), ``dd`` ``mib`` MiB
    with ``oflag=direct`` to each, read ``query-blockstats`` before and after.  With
    ``passes`` > 1 the disks take turns that many times (the first pass allocates the
    qcow2 clusters, later ones overwrite them); every pass is returned, in order."""
    from kvmkit.qemu import qemu_img
    from kvmkit.qemu.config import Drive, _blockdev_json, guest_kit_config
    from kvmkit.qemu.machine import QemuMachine

    kit = kit_with_ide()
    with tempfile.TemporaryDirectory(prefix="kvmkit-demo-io-") as tmp:
        base = Path(tmp)
        disk_size = f"{mib + 16}M"
        for name in ("ide0", "virtio0"):
            qemu_img.create(base / f"{name}.qcow2", disk_size, fmt="qcow2")
        ide = Drive(str(base / "ide0.qcow2"), node="ide0")
        config = guest_kit_config(
            kit,
            machine="pc",
            memory_mib=256,
            drives=[Drive(str(base / "virtio0.qcow2"), node="virtio0")],
            extra_args=[
                "-blockdev",
                _blockdev_json(ide, "file"),
                "-blockdev",
                _blockdev_json(ide),
                "-device",
                "ide-hd,drive=ide0,id=ide0,bus=ide.0,unit=0",
            ],
        )
        async with QemuMachine(config, base_dir=base) as vm:
            await vm.wait_ready()
            accel = str(vm.describe().get("accel"))
            devices = {
                "ide0": await _guest_disk(vm, "sd"),
                "virtio0": await _guest_disk(vm, "vd"),
            }
            results = []
            turns = [
                ("ide0", "IDE (emulated)", "emulated"),
                ("virtio0", "virtio-blk (paravirtual)", "paravirtual"),
            ] * passes
            for index, (node, disk, kind) in enumerate(turns):
                dev = devices[node]
                before = (await _blockstats(vm.qmp))[node]
                start = time.perf_counter()
                report = await vm.console.run(
                    f"dd if=/dev/zero of=/dev/{dev} bs={DD_BLOCK} count={mib} oflag=direct 2>&1",
                    timeout=300.0,
                )
                seconds = time.perf_counter() - start
                after = (await _blockstats(vm.qmp))[node]
                delta = {k: after[k] - before[k] for k in after}
                results.append(
                    DiskWrite(
                        disk=disk,
                        kind=kind,
                        guest_device=f"/dev/{dev}",
                        pass_index=index // 2,
                        mib=mib,
                        seconds=seconds,
                        dd_report=report.strip().splitlines()[-1] if report.strip() else "",
                        **delta,
                    )
                )
                say(f"  {disk}, pass {index // 2 + 1}: {mib} MiB in {seconds:.2f} s")
    return results, {"accel": accel, "kernel": kit.kernel_version, "machine": "pc"}


async def _guest_disk(vm: Any, prefix: str) -> str:
    """The guest's name of its one disk whose name starts with ``prefix`` (sd, vd)."""
    names = (await vm.console.run("ls /sys/block")).split()
    found = [n for n in names if n.startswith(prefix)]
    if len(found) != 1:
        raise IoStepError(f"the guest sees block devices {names}; expected one {prefix}*")
    return found[0]


def kit_with_ide() -> Any:
    """The guest kit, rebuilt once if it predates the IDE modules in its module list."""
    from kvmkit.qemu import guestkit

    kit = guestkit.ensure_kit()
    if not all(m in kit.modules for m in ("ata_piix", "sd_mod")):
        kit = guestkit.build_kit(kit.kernel_version, force=True)
    return kit


# ---- the step -------------------------------------------------------------------------------


def io_step(
    say: Say, task: Task, *, report: Path | None = None, quick: bool = False, linux: bool = True
) -> dict[str, Any]:
    """Run the step; print as it goes; return the figures (plots into ``report``).
    ``linux=False`` leaves out the QEMU part (``--no-linux``)."""
    import os
    import shutil

    import trio

    from kvmkit.qemu.accel import choose_accel, kvm_backend

    step_start = time.perf_counter()
    backend = kvm_backend()
    figures: dict[str, Any] = {"backend": backend, "skipped": {}, "notes": []}
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        figures["skipped"]["runner"] = "no usable /dev/kvm"
        say("  kvmkit runner part skipped: no usable /dev/kvm")
    else:
        ring_bytes = 1 * MiB
        with task("sending bytes through the UART and through the pvring"):
            transfers, notes = measure_runner(
                uart_budget_s=1.0 if quick else 8.0, ring_bytes=ring_bytes
            )
        figures["runner"] = {
            "accel": f"kvm ({backend})",
            "transfers": [t.to_json() for t in transfers],
            **notes,
        }
        say(format_transfers(figures["runner"]))
        if notes["uart_bytes"] < UART_MAX:
            figures["notes"].append(
                f"the UART sent {_size(notes['uart_bytes'])}, not 1 MiB: at "
                f"{notes['uart_us_per_byte']:.0f} µs per byte 1 MiB would take "
                f"{notes['uart_1mib_estimate_s']:.0f} s here; exits per KiB do not depend "
                "on the size"
            )
    if not linux:
        figures["skipped"]["qemu"] = "not requested (--no-linux)"
        say("  QEMU part skipped: not requested (--no-linux)")
    elif shutil.which("qemu-system-x86_64") is None:
        figures["skipped"]["qemu"] = "qemu-system-x86_64 is not installed"
        say("  QEMU part skipped: qemu-system-x86_64 is not installed")
    else:
        linux_accel = choose_accel(None).name
        mib = DISK_MIB if linux_accel == "kvm" or not quick else DISK_MIB_TCG_QUICK
        if mib < DISK_MIB:
            figures["notes"].append(
                f"under TCG in quick mode each disk gets {mib} MiB, not {DISK_MIB} MiB"
            )
        with task(f"Linux under QEMU ({linux_accel}): dd {mib} MiB to IDE and to virtio-blk"):
            disks, meta = trio.run(_measure_disks_quietly, mib, 1 if quick else 2)
        figures["qemu"] = {
            **meta,
            "passes": [d.to_json() for d in disks],
            "writes": [best.to_json() for best in _fastest(disks)],
        }
        say(format_disks(figures["qemu"]))
    if backend == "pvm":
        figures["notes"].append(
            "PVM host: CPL-0 code is emulated (so pvio copies at CPL 3, natively) and each "
            "exit is a trip through the host kernel's emulator, dearer than on VT-x/AMD-V; "
            "the Linux guest runs under TCG, where QEMU emulates the CPU as well as the disks"
        )
    figures["step_s"] = time.perf_counter() - step_start
    for note in figures["notes"]:
        say(f"  Note: {note}.")
    for line in read_it(figures):
        say(f"  Read it: {line}")
    if report is not None:
        from kvmkit.demos.report import write_io_plots

        figures["plots"] = write_io_plots(figures, report)
        say(f"  plots: {', '.join(figures['plots'])}")
    return figures


def read_it(figures: dict[str, Any]) -> list[str]:
    """What the numbers say, from the numbers (a claim they do not bear out is said so)."""
    lines = []
    runner = figures.get("runner")
    if runner:
        ts = runner["transfers"]
        uart = next(t for t in ts if t["way"] == "UART")
        rings = [t for t in ts if t["way"] == "pvring"]
        best = max(rings, key=lambda t: t["mib_per_s"] or 0)
        lines.append(
            f"the emulated UART took {uart['exits_per_kib']:.0f} exits per KiB (one per "
            f"byte) and moved {uart['mib_per_s']:.3g} MiB/s; the ring took at most "
            f"{max(t['exits'] for t in rings)} exit(s) for {_size(rings[0]['bytes'])} at any batch size, "
            f"the doorbells being ioeventfds, and reached {best['mib_per_s']:.3g} MiB/s "
            f"({best['mib_per_s'] / uart['mib_per_s']:,.0f}x) at {_size(best['batch'])} per "
            "doorbell; with doorbells that exit it costs one exit per batch."
        )
    qemu = figures.get("qemu")
    if qemu:
        ws = {w["kind"]: w for w in qemu["writes"]}
        ide, virtio = ws["emulated"], ws["paravirtual"]
        ratio = virtio["mib_per_s"] / ide["mib_per_s"]
        verdict = (
            f"virtio-blk wrote {ratio:.2g}x as fast as IDE"
            if ratio >= 1.1
            else f"virtio-blk was NOT faster than IDE here ({ratio:.2g}x)"
        )
        lines.append(
            f"under QEMU ({qemu['accel']}) {verdict}: {virtio['mib_per_s']:.3g} against "
            f"{ide['mib_per_s']:.3g} MiB/s, in {virtio['wr_operations']} and "
            f"{ide['wr_operations']} write requests."
        )
        if ratio < 1.1 and qemu["accel"] == "tcg":
            lines.append(
                "under TCG there are no exits: QEMU translates every guest instruction, "
                "and an access to an IDE register costs about as much as any other, so the "
                "two disks come out close (which wins changes between runs); the paravirtual "
                "advantage is in exits saved, which only KVM (VT-x/AMD-V) has."
            )
    return lines


async def _measure_disks_quietly(mib: int, passes: int) -> tuple[list[DiskWrite], dict[str, Any]]:
    return await measure_disks(mib, say=lambda _line: None, passes=passes)


def _fastest(writes: list[DiskWrite]) -> list[DiskWrite]:
    """Per disk, in first-seen order, the pass that took least time (the host is shared:
    the fastest pass is the one least disturbed)."""
    best: dict[str, DiskWrite] = {}
    for w in writes:
        if w.disk not in best or w.seconds < best[w.disk].seconds:
            best[w.disk] = w
    return list(best.values())


def format_transfers(runner: dict[str, Any]) -> str:
    from kvmkit.ui import make_table

    columns = ["way", "kind", "bytes", "exits", "exits/KiB", "device exits", "MiB/s", "data"]
    rows = [
        [
            t["label"],
            t["kind"],
            _size(t["bytes"]),
            f"{t['exits']:,}",
            f"{t['exits_per_kib']:.3g}",
            f"{t['device_exits']:,}",
            f"{t['mib_per_s']:.3g}",
            "CRC-32 ok" if t["checksum_ok"] else "WRONG",
        ]
        for t in runner["transfers"]
    ]
    return _render(make_table(columns, rows, numeric=columns[2:7]))


def format_disks(qemu: dict[str, Any]) -> str:
    from kvmkit.ui import make_table

    columns = [
        "disk",
        "pass",
        "accel",
        "MiB",
        "MiB/s",
        "wr_operations",
        "wr_bytes",
        "wr_total_time_ns",
    ]
    rows = [
        [
            w["disk"],
            str(w["pass_index"] + 1),
            qemu["accel"],
            str(w["mib"]),
            f"{w['mib_per_s']:.3g}",
            f"{w['wr_operations']:,}",
            f"{w['wr_bytes']:,}",
            f"{w['wr_total_time_ns']:,}",
        ]
        for w in qemu["passes"]
    ]
    return _render(make_table(columns, rows, numeric=columns[3:]))


def _render(table: Any) -> str:
    import io as _io

    from rich.console import Console

    buffer = _io.StringIO()
    Console(file=buffer, width=200, highlight=False).print(table)
    return "\n".join("  " + line for line in buffer.getvalue().rstrip().splitlines())
