"""Demo step ``snapshots``: a running minimal VM saved, cloned and moved.

The ``dirty`` guest keeps a LAPIC timer ticking and writes memory every tick, then prints
a checksum of everything it wrote.  This step

1. snapshots it mid-run (every vCPU paused, its registers, the interrupt controllers, the
   timers, every device and all of memory written to a directory);
2. restores that one snapshot twice, as Firecracker's users clone microVMs: guest memory
   is mapped copy-on-write from the snapshot, so neither clone changes it, and both print
   the checksum the uninterrupted guest prints;
3. live-migrates a guest that prints a line every few ticks to a second VM (pre-copy on
   KVM's dirty ring, over a unix socket): the lines go on, from the second VM, and the
   report gives the downtime and a plot of the pages sent per round.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, Any

EXPLANATION = (
    "A VM's state is small and well defined: each vCPU's registers, the interrupt "
    "controllers and timers, the devices, and memory. We pause a running guest, save all "
    "of it, start two copies from that one snapshot (memory mapped copy-on-write, so a "
    "restore does not read it all), then move a running guest to another VM while it "
    "prints: memory is copied while the guest runs, the pages it dirties meanwhile are "
    "copied again, round after round, and only the last few are copied with it paused."
)

MiB = 1 << 20
SNAP_ARGS = "ticks=60 rate=1024 mem=16"
MIGRATE_ARGS = "ticks=300 rate=1024 mem=16 print=25"

Say = Callable[[str], None]
Task = Callable[[str], AbstractContextManager[Any]]


def _config(image: Path, args: str, echo: Any = None) -> Any:
    from kvmkit.runner.machine import RunConfig

    return RunConfig(image=image, append=args, mem_size=128 * MiB, echo=echo)


def _checksum(console: str) -> str:
    return next((ln for ln in console.splitlines() if "checksum" in ln), "(no checksum)")


def snapshots_step(
    say: Say, task: Task, *, report: Path | None = None, quick: bool = False
) -> dict[str, Any]:
    """Run the step, print as it goes, return the figures (and write the plot into
    ``report`` when given)."""
    from kvmkit.guests import build_guest
    from kvmkit.kvm import Kvm
    from kvmkit.runner.machine import Machine, run_guest

    figures: dict[str, Any] = {}
    image = build_guest("dirty")
    tmp = Path(tempfile.mkdtemp(prefix="kvmkit-demo-snap."))
    try:
        with Kvm() as kvm:
            with task("an uninterrupted run, for reference"):
                whole = run_guest(_config(image, SNAP_ARGS), kvm=kvm)
            say(f"  uninterrupted:   {_checksum(whole.console)}")

            snap = tmp / "snap"
            with task("running the guest and snapshotting it 0.3 s in"):
                first = run_guest(
                    _config(image, SNAP_ARGS),
                    kvm=kvm,
                    action=(0.3, lambda m: (m.snapshot(snap, resume=False), ("snapshot", ""))[1]),
                )
            size = sum(f.stat().st_blocks * 512 for f in snap.iterdir())
            say(f"  snapshot written to a directory: {size / MiB:.1f} MiB on disk")
            clones = []
            for n in (1, 2):
                t0 = time.perf_counter()
                with Machine.restore(snap, kvm=kvm, echo=None) as m:
                    ready = (time.perf_counter() - t0) * 1000
                    r = m.run()
                clones.append({"ready_ms": round(ready, 2), "checksum": _checksum(r.console)})
                say(f"  clone {n}: ready in {ready:.1f} ms, then {_checksum(r.console)}")
            figures["snapshot"] = {
                "uninterrupted": _checksum(whole.console),
                "before_snapshot": first.console.strip(),
                "clones": clones,
                "disk_mib": round(size / MiB, 1),
            }
            if any(c["checksum"] != _checksum(whole.console) for c in clones):
                raise RuntimeError("a clone computed another checksum than the uninterrupted run")

            figures["migration"] = _migrate(kvm, image, tmp, say, task)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if report is not None:
        figures["plots"] = [write_plot(figures["migration"], report)]
    return figures


class _Lines:
    """A console echo stream that prints whole guest lines through ``say``."""

    def __init__(self, say: Say, who: str) -> None:
        self.say, self.who, self.buf = say, who, ""

    def write(self, text: str) -> None:
        self.buf += text
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            self.say(f"  [{self.who}] {line}")

    def flush(self) -> None:
        pass


def _migrate(kvm: Any, image: Path, tmp: Path, say: Say, task: Task) -> dict[str, Any]:
    """Migrate a printing guest to ``kvmkit run --incoming`` in a second process (as to
    another host), whose console lines are shown as they come."""
    import subprocess

    from kvmkit.runner.machine import run_guest
    from kvmkit.runner.migration.destination import start_destination

    addr = f"unix:{tmp}/migrate.sock"
    dest = start_destination(addr, stdout=subprocess.PIPE)
    assert dest.stdout is not None
    said: list[str] = []
    printer = _Lines(say, "destination")

    def show(stream: IO[bytes]) -> None:
        for raw in stream:
            said.append(raw.decode(errors="replace"))
            printer.write(said[-1])

    shown = threading.Thread(target=show, args=(dest.stdout,), name="demo-destination")
    shown.start()
    stats: dict[str, Any] = {}

    def act(machine: Any) -> tuple[str, str]:
        s = machine.migrate(addr, downtime_ms=50)
        stats.update(s.to_dict())
        return "migrated", ""

    try:
        src = run_guest(
            _config(image, MIGRATE_ARGS, echo=_Lines(say, "source")),  # a TextIO enough
            kvm=kvm,
            action=(0.3, act),
            dirty_tracking=True,
        )
        if src.reason != "migrated":
            raise RuntimeError(f"the guest was not migrated: {src.reason} {src.detail}")
        dest.wait(timeout=60)  # it runs the guest to its end
    finally:
        if dest.poll() is None:
            dest.kill()
            dest.wait()
        shown.join(10)
        assert dest.stderr is not None
        err = dest.stderr.read()  # a few lines: what it said besides the console
        dest.stdout.close()
        dest.stderr.close()
    if dest.returncode != 0 or "checksum 0x" not in "".join(said):
        raise RuntimeError(
            f"the migrated guest ended badly (status {dest.returncode}): "
            f"{err.decode(errors='replace')[-300:]}"
        )
    say(
        f"  migrated in {stats['total_ms']:.1f} ms over {stats['rounds']} rounds, "
        f"downtime {stats['downtime_ms']:.1f} ms; pages per round: {stats['pages_per_round']}"
    )
    return stats


def write_plot(stats: dict[str, Any], directory: Path) -> str:
    """``snapshots_rounds.png``: pages sent per pre-copy round (log scale)."""
    from kvmkit.demos.report import _pyplot

    plt = _pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    pages = stats["pages_per_round"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bars = ax.bar(range(len(pages)), pages, color=["C0"] * (len(pages) - 1) + ["C3"])
    ax.bar_label(bars, labels=[str(p) for p in pages], fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("round (0: all memory; last, red: with the guest paused)", fontsize=8)
    ax.set_ylabel("pages sent (log scale)", fontsize=8)
    ax.set_title(
        f"Live migration of a 128 MiB minimal VM: downtime {stats['downtime_ms']:.1f} ms, "
        f"total {stats['total_ms']:.0f} ms",
        fontsize=9,
    )
    fig.tight_layout()
    name = "snapshots_rounds.png"
    fig.savefig(directory / name, dpi=110)
    plt.close(fig)
    return name
