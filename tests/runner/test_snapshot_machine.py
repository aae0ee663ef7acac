"""Snapshot and restore of a whole running machine (``Machine.snapshot``/``restore`` and
``kvmkit run --snapshot``/``kvmkit restore``), checked against an uninterrupted run of
the ``dirty`` guest: a periodic LAPIC timer taken at CPL 3 while memory is dirtied, and a
checksum of every page at the end.

The 20 random moments run in this one process (one baseline per configuration, reused);
the seed is printed so a failure can be replayed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmkit.kvm import Kvm
from kvmkit.runner.errors import MachineEndedError
from kvmkit.runner.machine import Machine, RunConfig, RunResult, run_guest

MiB, GiB = 1 << 20, 1 << 30
#: (vCPUs, RAM): the four machines of the issue; 5 moments each.
CONFIGS = [(1, 64 * MiB), (4, 64 * MiB), (1, 1 * GiB), (4, 1 * GiB)]
MOMENTS_PER_CONFIG = 5
ARGS = "ticks=100 rate=256 mem=16"
SEED = int(os.environ.get("KVMKIT_SNAPSHOT_SEED", "12"))


def _config(image: Path, vcpus: int, mem: int) -> RunConfig:
    return RunConfig(image=image, append=ARGS, vcpus=vcpus, mem_size=mem, echo=None)


@pytest.fixture(scope="module")
def kvm(require_kvm: None) -> Kvm:
    with Kvm() as k:
        yield k  # type: ignore[misc]


def _snapshot_then_restore(
    kvm: Kvm, image: Path, vcpus: int, mem: int, at: float, where: Path
) -> tuple[str, int | None, bool]:
    """Console and exit code of a run snapshotted ``at`` s in and restored from there,
    and whether the snapshot came before the guest's end."""

    def act(machine: Machine) -> tuple[str, str] | None:
        try:
            machine.snapshot(where, resume=False)
        except MachineEndedError:  # the guest ended at that very moment
            return None
        return "snapshot", "written"

    first = run_guest(_config(image, vcpus, mem), kvm=kvm, action=(at, act))
    if first.reason != "snapshot":  # the guest ended before the moment came
        return first.console, first.exit_code, False
    with Machine.restore(where, kvm=kvm, echo=None, expect_vcpus=vcpus) as m:
        second = m.run()
    shutil.rmtree(where)
    return first.console + second.console, second.exit_code, True


def test_snapshot_at_20_random_moments_gives_the_uninterrupted_result(
    kvm: Kvm, guest_image, tmp_path: Path
) -> None:
    image = guest_image("dirty")
    rng = random.Random(SEED)
    print(f"seed {SEED}", file=sys.stderr)
    restored_mid_run = 0
    for vcpus, mem in CONFIGS:
        base: RunResult = run_guest(_config(image, vcpus, mem), kvm=kvm)
        assert (base.reason, base.exit_code) == ("exit", 0), base.console
        assert "checksum 0x" in base.console
        for _ in range(MOMENTS_PER_CONFIG):
            at = rng.uniform(0.02, 0.9)
            console, code, mid = _snapshot_then_restore(kvm, image, vcpus, mem, at, tmp_path / "s")
            assert (console, code) == (base.console, 0), (vcpus, mem, at)
            restored_mid_run += mid
    assert restored_mid_run >= len(CONFIGS) * MOMENTS_PER_CONFIG - 2  # nearly all mid-run


def test_one_snapshot_restores_twice_identically(kvm: Kvm, guest_image, tmp_path: Path) -> None:
    image = guest_image("dirty")
    base = run_guest(_config(image, 1, 64 * MiB), kvm=kvm)
    where = tmp_path / "s"
    run_guest(
        _config(image, 1, 64 * MiB),
        kvm=kvm,
        action=(0.3, lambda m: (m.snapshot(where, resume=False), ("snapshot", ""))[1]),
    )
    outs = []
    for eager in (False, True):
        with Machine.restore(where, kvm=kvm, echo=None, eager=eager) as m:
            r = m.run()
        outs.append((r.reason, r.exit_code, r.console))
    assert outs[0] == outs[1]
    assert base.console.endswith(outs[0][2])


# ---- the command line -------------------------------------------------------------------


def _kvmkit(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmkit", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def cli_snapshot(require_kvm: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("cli") / "snap"
    p = _kvmkit("run", "dirty", "--snapshot", str(where), "--snapshot-after", "0.3")
    assert p.returncode == 0, p.stderr
    assert f"snapshot written to {where}" in p.stderr
    return where


def test_cli_restore_runs_to_the_end(cli_snapshot: Path) -> None:
    p = _kvmkit("restore", str(cli_snapshot), "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert (doc["reason"], doc["exit_code"]) == ("exit", 0)
    assert "checksum 0x" in doc["console"]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _refused(p: subprocess.CompletedProcess[str], *words: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvmkit restore: error:"), p.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_cli_refuses_a_truncated_memory_file(cli_snapshot: Path, tmp_path: Path) -> None:
    snap = _copy(cli_snapshot, tmp_path / "s")
    with open(snap / "memory-0.bin", "r+b") as f:
        f.truncate(4096)
    _refused(_kvmkit("restore", str(snap)), "truncated")


def test_cli_refuses_a_truncated_manifest(cli_snapshot: Path, tmp_path: Path) -> None:
    snap = _copy(cli_snapshot, tmp_path / "s")
    data = (snap / "manifest.json").read_bytes()
    (snap / "manifest.json").write_bytes(data[: len(data) // 2])
    _refused(_kvmkit("restore", str(snap)), "not valid JSON")


def test_cli_refuses_a_corrupted_state(cli_snapshot: Path, tmp_path: Path) -> None:
    snap = _copy(cli_snapshot, tmp_path / "s")
    doc = json.loads((snap / "manifest.json").read_text())
    doc["vcpus"][0]["regs"]["rip"] ^= 0x10
    (snap / "manifest.json").write_text(json.dumps(doc))
    _refused(_kvmkit("restore", str(snap)), "checksum")


def test_cli_eager_restore_finds_corrupted_memory(cli_snapshot: Path, tmp_path: Path) -> None:
    snap = _copy(cli_snapshot, tmp_path / "s")
    with open(snap / "memory-0.bin", "r+b") as f:
        f.seek(5 << 20)
        f.write(b"\xff" * 8)
    _refused(_kvmkit("restore", "--eager", str(snap)), "checksum")


def test_cli_refuses_another_version(cli_snapshot: Path, tmp_path: Path) -> None:
    snap = _copy(cli_snapshot, tmp_path / "s")
    doc = json.loads((snap / "manifest.json").read_text())
    doc["format_version"] = 99
    (snap / "manifest.json").write_text(json.dumps(doc))
    _refused(_kvmkit("restore", str(snap)), "version 99")


def test_cli_refuses_another_vcpu_count(cli_snapshot: Path) -> None:
    _refused(_kvmkit("restore", "--vcpus", "4", str(cli_snapshot)), "1 vCPUs")


def test_cli_refuses_a_missing_snapshot(tmp_path: Path) -> None:
    _refused(_kvmkit("restore", str(tmp_path / "nothing")), "not a snapshot")


def test_cli_snapshot_needs_both_options(tmp_path: Path) -> None:
    p = _kvmkit("run", "dirty", "--snapshot", str(tmp_path / "s"))
    assert p.returncode == 2 and "go together" in p.stderr


def test_cli_snapshot_that_cannot_be_written_is_a_clear_error() -> None:
    p = _kvmkit("run", "dirty", "--snapshot", "/proc/kvmkit-no-snapshot", "--snapshot-after", "0.2")
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("kvmkit run: error: cannot create")


def test_pauses_nest_and_a_snapshot_inside_one_keeps_the_guest_paused(
    kvm: Kvm, guest_image, tmp_path: Path
) -> None:
    """pause() twice (no hang), snapshot() while paused, then the guest runs again only
    after the second resume(); the run still ends with the uninterrupted result."""
    image = guest_image("dirty")
    base = run_guest(_config(image, 1, 64 * MiB), kvm=kvm)
    seen: list[bool] = []

    def act(machine: Machine) -> tuple[str, str] | None:
        machine.pause()
        machine.pause(timeout=1)
        machine.snapshot(tmp_path / "s")  # its own pause and resume nest inside ours
        seen.append(machine.gate.requested)
        machine.resume()
        seen.append(machine.gate.requested)
        machine.resume()
        seen.append(machine.gate.requested)
        machine.resume()  # one too many: nothing happens
        seen.append(machine.gate.requested)
        return None

    r = run_guest(_config(image, 1, 64 * MiB), kvm=kvm, action=(0.1, act))
    assert seen == [True, True, False, False]
    assert (r.console, r.exit_code) == (base.console, 0)
    assert (tmp_path / "s" / "manifest.json").exists()
