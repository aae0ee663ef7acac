"""The demo in quick mode: every step produced its figures, and the report's files exist
and are real PNGs/JSON/Markdown that show those figures."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest

from kvmkit.demos.main import DemoOptions, run_demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_quick_demo_produces_every_figure_and_the_report(
    require_kvm: None, qemu_binary: str, tmp_path: Path
) -> None:
    out = io.StringIO()
    figures = run_demo(DemoOptions(quick=True, report=tmp_path), out=out)
    text = out.getvalue()
    assert figures["skipped"] == {}, figures["skipped"]
    assert figures["failed"] == {}, figures["failed"]
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

    exit_figures = figures["exits"]["figures"]
    ways = {f["way"] for f in exit_figures}
    assert ways == {"raw C KVM_RUN loop", "kvmkit C fast path", "kvmkit Python loop"}
    assert len(exit_figures) == 9
    assert all(f["marks_us"] > 0 and f["n2"] > f["n1"] for f in exit_figures)
    assert "raw C KVM_RUN loop" in text

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


def test_a_step_that_raises_is_failed_not_skipped(
    require_kvm: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The demo's own reporting path: a step whose measurement raises is FAILED with the
    error, the other steps still run, and ``kvmkit demo`` exits 1."""
    from kvmkit.commands import demo as demo_command
    from kvmkit.demos import engines, exits

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("deliberately broken step")

    monkeypatch.setattr(exits, "measure", broken)
    monkeypatch.setattr(engines, "compare_engines", broken)
    out = io.StringIO()
    figures = run_demo(DemoOptions(quick=True, linux=False, report=tmp_path), out=out)
    assert figures["failed"] == {
        "engines": "RuntimeError: deliberately broken step",
        "exits": "RuntimeError: deliberately broken step",
    }
    assert "linux" in figures["skipped"] and "exits" not in figures["skipped"]
    assert "FAILED: RuntimeError: deliberately broken step" in out.getvalue()
    assert "## FAILED" in (tmp_path / "report.md").read_text()
    args = argparse.Namespace(quick=True, report=None, no_linux=True)
    assert demo_command.run(args) == 1
