"""``python -m benchmarks``: a benchmark that raises is FAILED and the command exits
non-zero; one whose host lacks something is skipped with the reason; ``--json`` records
which."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FAILING = Path(__file__).with_name("failing")


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KVMKIT_BENCH_PATH=str(FAILING))
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_broken_benchmark_fails_the_run(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = _bench("--only", "broken", "--only", "lacking", "--json", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED bench_broken: RuntimeError: this benchmark is broken on purpose" in proc.stderr
    status = json.loads(out.read_text())["meta"]["status"]
    assert status == {
        "bench_broken": {
            "status": "failed",
            "detail": "RuntimeError: this benchmark is broken on purpose",
        },
        "bench_lacking": {"status": "skipped", "detail": "this host has no flux capacitor"},
    }


def test_a_skipped_benchmark_alone_does_not_fail(tmp_path: Path) -> None:
    proc = _bench("--only", "lacking")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "this host has no flux capacitor" in proc.stdout


def test_an_unknown_benchmark_name_is_an_error() -> None:
    proc = _bench("--only", "no-such-benchmark")
    assert proc.returncode == 2
    assert "no benchmark named no-such-benchmark" in proc.stderr
