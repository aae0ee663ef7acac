"""Demo step ``io`` in quick mode, selected with ``--steps``: its figures are counted and
checked, its plots and report section exist, and ``--steps`` refuses unknown names."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvmkit.demos.main import STEP_NAMES, DemoOptions, UnknownStepError, parse_steps, run_demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MiB = 1 << 20


def test_io_step_alone_produces_its_figures_and_plots(
    require_kvm: None, qemu_binary: str, tmp_path: Path
) -> None:
    out = io.StringIO()
    figures = run_demo(DemoOptions(quick=True, report=tmp_path, steps=("io",)), out=out)
    text = out.getvalue()
    assert figures["failed"] == {} and figures["skipped"] == {}, figures
    assert set(figures) == {"quick", "skipped", "failed", "io"}  # no other step ran
    step = figures["io"]
    assert step["backend"] in ("vmx", "svm", "pvm", "other")
    assert step["skipped"] == {}

    transfers = {t["label"]: t for t in step["runner"]["transfers"]}
    assert all(t["checksum_ok"] for t in transfers.values())
    uart = transfers["UART"]
    assert uart["device_exits"] == uart["bytes"] and uart["exits_per_kib"] >= 1024
    rings = [t for t in transfers.values() if t["way"] == "pvring"]
    assert [t["batch"] for t in rings] == [64, 1024, 16384, 65536]
    for ring in rings:
        assert ring["bytes"] == MiB and ring["device_exits"] == 1  # the set-up only
        assert ring["exits"] <= 8, ring
    exiting = transfers["pvring, doorbell exits, 4 KiB/doorbell"]
    assert exiting["device_exits"] == exiting["doorbells"] + 1

    qemu = step["qemu"]
    writes = {w["kind"]: w for w in qemu["writes"]}
    assert set(writes) == {"emulated", "paravirtual"}
    for w in writes.values():
        assert w["wr_bytes"] == w["mib"] * MiB and w["wr_operations"] > 0
        assert w["mib_per_s"] > 0
    assert writes["emulated"]["guest_device"].startswith("/dev/sd")
    assert writes["paravirtual"]["guest_device"].startswith("/dev/vd")
    assert qemu["accel"] in ("kvm", "tcg")

    for png in ("io_exits.png", "io_throughput.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC
    assert json.loads((tmp_path / "figures.json").read_text())["io"]["plots"] == step["plots"]
    report = (tmp_path / "report.md").read_text()
    assert "## Emulated and paravirtual I/O" in report and "(io_exits.png)" in report
    assert "Read it:" in text and "Step 6" in text
    if step["backend"] == "pvm":
        assert any("CPL-0 code is emulated" in n for n in step["notes"])


def test_parse_steps_names_the_unknown_ones() -> None:
    assert parse_steps("containers, io") == ("containers", "io")
    with pytest.raises(UnknownStepError, match="bogus.*choose from " + ",".join(STEP_NAMES)):
        parse_steps("io,bogus")
    with pytest.raises(UnknownStepError, match="none given"):
        parse_steps(",")


def test_cli_unknown_step_is_a_one_line_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kvmkit", "demo", "--steps", "io,nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown demo step(s): nope" in lines[0], proc.stderr
    assert proc.stdout == ""
