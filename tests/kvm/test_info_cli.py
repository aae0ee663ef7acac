from __future__ import annotations

import json
import subprocess
import sys


def test_kvmkit_info_json_reports_api_and_backend(require_kvm: None) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvmkit", "info", "--json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    info = json.loads(out)
    assert info["api_version"] == 12
    assert info["backend"] in ("vmx", "svm", "pvm", "unknown")
    assert info["backend_meaning"]
    assert info["memory_slots"] > 0
    assert set(info["capabilities"]) >= {"irqchip", "pit2", "user_memory", "immediate_exit"}


def test_kvmkit_info_table(require_kvm: None) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvmkit", "info"], check=True, capture_output=True, text=True
    ).stdout
    assert "api version     12" in out and "backend" in out
