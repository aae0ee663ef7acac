"""The demo's ``snapshots`` step: snapshot a running guest, restore it twice, migrate it
while it prints; the downtime and the plot of pages per round."""

from __future__ import annotations

import io
from pathlib import Path

from kvmkit.demos.main import DemoOptions, parse_steps, run_demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_snapshots_step_clones_and_migrates(require_kvm: None, tmp_path: Path) -> None:
    out = io.StringIO()
    figures = run_demo(
        DemoOptions(quick=True, report=tmp_path, steps=parse_steps("snapshots")), out=out
    )
    assert figures["failed"] == {} and figures["skipped"] == {}, figures
    snap = figures["snapshots"]["snapshot"]
    assert len(snap["clones"]) == 2
    assert all(c["checksum"] == snap["uninterrupted"] for c in snap["clones"])
    assert "checksum 0x" in snap["uninterrupted"]
    mig = figures["snapshots"]["migration"]
    assert mig["rounds"] >= 2 and mig["downtime_ms"] > 0
    assert mig["pages_per_round"][0] == (128 << 20) // 4096
    text = out.getvalue()
    assert "[source] dirty: tick 0" in text
    assert "[destination] dirty: 300 ticks" in text  # the destination finished the run
    assert f"downtime {mig['downtime_ms']:.1f} ms" in text
    assert (tmp_path / "snapshots_rounds.png").read_bytes()[:8] == PNG_MAGIC
