"""The ``containers`` demo step's parts on the real host: containers and kvmkit VMs are
measured and leave nothing behind, and the table and plots come out.  (The QEMU Linux
part runs in the quick demo test under tests/demos.)"""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from kvmkit.demos import containers as step

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _demo_leftovers() -> list[str]:
    prefix = f"kkdemo{os.getpid()}-"
    root = Path("/sys/fs/cgroup")
    return [str(p) for p in [*root.glob(f"lxc.*.{prefix}*"), *root.glob(f"*/lxc.*.{prefix}*")]]


def _children() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def test_containers_round(require_lxc: None) -> None:
    rounds, uname = step.measure_containers((1, 2))
    assert uname == os.uname().release  # the container runs on the host's kernel
    assert [(r.count, r.summary()["answered"]) for r in rounds] == [(1, 1), (2, 2)]
    for inst in (i for r in rounds for i in r.instances):
        assert inst.problem == "" and inst.start_s is not None and inst.start_s > 0
        assert "Please press Enter" in inst.first_line
        assert inst.memory_bytes is not None and inst.memory_bytes > 0
    assert _demo_leftovers() == []  # lxc-stop returns once LXC removed the cgroups


def test_kvmkit_vm_round(require_kvm: None) -> None:
    before = {p.pid for p in _children()}
    (rnd,) = step.measure_kvmkit_vms((2,))
    summary = rnd.summary()
    assert summary["answered"] == 2 and summary["problems"] == []
    for inst in rnd.instances:
        assert inst.first_line == "Hello from kvmkit guest"
        assert inst.start_s is not None and inst.inner_s is not None
        assert 0 < inst.inner_s < inst.start_s  # in-process part of the whole start
        assert inst.memory_bytes is not None and inst.memory_bytes > 2**20
    assert {p.pid for p in _children()} <= before  # every worker was reaped


def test_worker_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert step._main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_table_and_plots(tmp_path: Path) -> None:
    """Formatting and plotting from figures shaped as the step makes them, including a
    hang and a part that did not run."""
    ok = step.Round("LXC container", 1, "none (host kernel)", "cgroup")
    ok.instances = [step.Instance(0, start_s=0.05, memory_bytes=2**20, first_line="x")]
    hung = step.Round("QEMU microvm Linux", 1, "tcg", "PSS")
    hung.instances = [step.Instance(0, problem="hang: not ready within 30 s")]
    figures = {
        "backend": "pvm",
        "rounds": [ok.to_json(), hung.to_json()],
        "skipped": {"QEMU pc Linux": "qemu-system-x86_64 is not installed"},
        "counts": {"containers_and_kvmkit_vms": [1], "linux": [1]},
    }
    text = step.format_rounds(figures)
    assert "LXC container" in text and "50 ms" in text and "1.0 MiB (cgroup)" in text
    assert "hang: not ready within 30 s" in text and "0/1" in text
    assert "skipped: qemu-system-x86_64 is not installed" in text
    names = step.write_plots(figures, tmp_path)
    assert names == ["containers_start.png", "containers_memory.png"]
    for name in names:
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
