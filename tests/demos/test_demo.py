"""The demo in quick mode: every step produced its figures, and the report's files exist
and are real PNGs/JSON/Markdown that show those figures."""

from __future__ import annotations

import io
import json
from pathlib import Path

from kvmkit.demos.main import DemoOptions, run_demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_quick_demo_produces_every_figure_and_the_report(
    require_kvm: None, qemu_binary: str, tmp_path: Path
) -> None:
    out = io.StringIO()
    figures = run_demo(DemoOptions(quick=True, report=tmp_path), out=out)
    text = out.getvalue()
    assert figures["skipped"] == {}, figures["skipped"]
    for step in ("Step 1", "Step 2", "Step 3", "Step 4"):
        assert step in text

    assert figures["host"]["api_version"] == 12
    engines = {e["engine"]: e for e in figures["engines"]}
    assert set(engines) == {
        "kvmkit runner, CPL 3",
        "kvmkit runner, CPL 0",
        "QEMU -accel kvm",
        "QEMU -accel tcg",
    }
    for e in engines.values():
        assert e["skipped"] is None and e["compute_s"] > 0 and e["rate_per_s"] > 0
        assert f"primes below {e['n']}" in e["answer"]
    assert engines["kvmkit runner, CPL 3"]["exits"] > 0

    kinds = {(c["case"], c["loop"]) for c in figures["exits"]}
    assert len(kinds) == 6
    assert all(c["exits"] >= 2000 and c["in_kvm_run_us"] > 0 for c in figures["exits"])

    linux = figures["linux"]
    assert linux["hotplug_disk"]["guest_name"].startswith("vd")
    assert linux["migration"]["status"] == "completed"
    assert linux["migration"]["counter_after"] > linux["migration"]["counter_before"]
    assert linux["migration"]["samples"]

    report = (tmp_path / "report.md").read_text()
    for png in ("engines.png", "exit_cost.png", "qmp_throughput.png", "migration_timeline.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC
        assert f"({png})" in report
    assert f"{linux['migration']['downtime_ms']} ms" in report
    assert engines["QEMU -accel tcg"]["engine"] in report
    assert json.loads((tmp_path / "figures.json").read_text())["engines"] == figures["engines"]
