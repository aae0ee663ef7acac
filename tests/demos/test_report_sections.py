"""The report has a section for the containers and snapshots steps' figures."""

from __future__ import annotations

from pathlib import Path

from kvmkit.demos.report import write_report


def test_containers_and_snapshots_sections(tmp_path: Path) -> None:
    figures = {
        "containers": {
            "rounds": [
                {
                    "kind": "LXC container",
                    "count": 4,
                    "accel": "none",
                    "median_start_s": 0.042,
                    "mean_memory_bytes": 600 * 1024,
                    "memory_measure": "cgroup",
                }
            ],
            "uname": {"LXC container": "6.1.0-host"},
            "skipped": {"QEMU pc Linux": "qemu-system-x86_64 is not installed"},
            "notes": [],
            "plots": ["containers_start.png"],
        },
        "snapshots": {
            "snapshot": {
                "uninterrupted": "0xabc",
                "disk_mib": 1.5,
                "clones": [{"ready_ms": 9.5, "checksum": "0xabc"}],
            },
            "migration": {"total_ms": 120.0, "downtime_ms": 9.0, "rounds": 3, "bytes": 4096},
            "plots": ["snapshots_rounds.png"],
        },
    }
    text = write_report(figures, tmp_path).read_text()
    assert "## VMs and containers" in text and "| LXC container | 4 | none | 42 ms |" in text
    assert "0.6 MiB (cgroup)" in text and "6.1.0-host" in text and "not installed" in text
    assert "![containers_start.png](containers_start.png)" in text
    assert "## Snapshot, clones and live migration" in text
    assert "Clone 1: ready in 9.5 ms, checksum 0xabc" in text
    assert "downtime ms 9.0" in text and "rounds 3" in text
