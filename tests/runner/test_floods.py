"""A guest must not be able to grow kvmkit's memory: RSS stays flat while the ``flood``
guest floods one channel at CPL 3 — debug console bytes, the PUTS hypercall, MARK
hypercalls, writes to unclaimed MMIO at ever new addresses, writes to unclaimed ports,
the UART's transmit register — until ``--timeout``.

Each case runs ``kvmkit run flood --json`` as its own process for :data:`FLOOD_S`
seconds.  The console stream (stderr under ``--json``) goes to /dev/null, the sink; the
JSON keeps only the last ``--console-limit`` bytes.  RSS of that process is sampled with
psutil; the flood runs during the last :data:`FLOOD_S` seconds of the process's life, and
the assertion is that RSS grows by at most :data:`BOUND_MIB` MiB from 1 s into the flood to
the end.  At the ~10,000–30,000 exits per second measured here, a leak of one small
object per exit (~100 B, e.g. a counter per new MMIO address) grows RSS by 3–9 MiB in
those 3 s; the PUTS flood that once leaked its payload grew by ~1.3 GB in 5 s.  Nothing is
timed: only memory and counts are asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from kvmkit.runner.context import MAX_MARKS
from kvmkit.runner.machine import RunResult

CHANNELS = ("debugcon", "puts", "marks", "mmio", "ports", "uart")
FLOOD_S = 4.0
STEADY_AFTER_S = 1.0
BOUND_MIB = 4
CONSOLE_LIMIT = 512  # well below what any flood writes (> 1000 exits), so some is dropped
#: What each channel's exits are, in the run's statistics.
EXIT_KIND = {"mmio": "mmio_write"}
MARK_PORT = "0x504"


def _flood(channel: str, out: Path) -> tuple[int, list[tuple[float, int]]]:
    """Run the flood; return its exit status and (seconds, RSS bytes) samples."""
    cmd = [sys.executable, "-m", "kvmkit", "run", "flood", "--append", f"channel={channel}"]
    cmd += ["--timeout", str(FLOOD_S), "--json", "--console-limit", str(CONSOLE_LIMIT)]
    samples: list[tuple[float, int]] = []
    with out.open("wb") as json_out:
        proc = subprocess.Popen(cmd, stdout=json_out, stderr=subprocess.DEVNULL)
        try:
            child = psutil.Process(proc.pid)
            start = time.monotonic()
            while proc.poll() is None and time.monotonic() - start < 120:
                try:
                    samples.append((time.monotonic() - start, child.memory_info().rss))
                except psutil.Error:  # it ended between poll() and the read
                    break
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    return proc.returncode, samples


@pytest.mark.parametrize("channel", CHANNELS)
def test_rss_stays_flat_while_a_guest_floods(
    channel: str, require_kvm: None, tmp_path: Path
) -> None:
    status, samples = _flood(channel, tmp_path / "result.json")
    result = json.loads((tmp_path / "result.json").read_text())
    assert (status, result["reason"]) == (124, "timeout"), result.get("detail")
    exits = result["exits"][EXIT_KIND.get(channel, "io_out")]
    assert exits > 1000, f"the {channel} flood hardly ran: {result['exits']}"

    end = samples[-1][0]
    steady = end - FLOOD_S + STEADY_AFTER_S
    window = [rss for t, rss in samples if t >= steady]
    assert len(window) >= 10, f"too few RSS samples after {steady:.2f} s: {samples}"
    growth = max(window) - window[0]
    assert growth <= BOUND_MIB << 20, (
        f"RSS grew by {growth / 2**20:.1f} MiB in the last {end - steady:.1f} s of a "
        f"{channel} flood ({exits} exits): {[(round(t, 2), r >> 20) for t, r in samples]}"
    )

    # what the run kept is bounded too, and accounts for every exit
    assert len(result["console"].encode()) <= CONSOLE_LIMIT
    if channel in ("debugcon", "puts", "uart"):
        assert result["console_dropped_bytes"] > 0
    if channel == "marks":
        marks = result["exits_by_port"][MARK_PORT]
        assert len(result["marks"]) <= MAX_MARKS
        assert len(result["marks"]) + result["marks_dropped"] == marks
    if channel in ("mmio", "ports"):
        assert len(result["unclaimed"]) <= 1025  # the per-address cap, plus "other"
        assert sum(result["unclaimed"].values()) >= exits - 16


@pytest.mark.parametrize("append", ["", "channel=nope"])
def test_the_flood_guest_refuses_a_missing_or_unknown_channel(
    append: str, guest_image: Callable[[str], Path], run_image: Callable[..., RunResult]
) -> None:
    r = run_image(guest_image("flood"), append=append)
    assert (r.reason, r.exit_code) == ("exit", 2)
    assert "channel=" in r.console
