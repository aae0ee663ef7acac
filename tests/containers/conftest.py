"""Fixtures for the LXC tests: a private lxcpath per test, container names unique to this
run (LXC names cgroups after the container, host-wide), and a factory whose containers are
destroyed at teardown, after which no cgroup or veth of theirs may remain."""

from __future__ import annotations

import itertools
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvmkit.containers import Container, ContainerError
from kvmkit.containers.lxc import TOOLS

RUN_PREFIX = f"kkt{os.getpid()}"
_counter = itertools.count()


@pytest.fixture(scope="session")
def require_lxc() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"LXC is not installed ({', '.join(missing)}; make test installs it)")
    if os.geteuid() != 0:
        pytest.skip("LXC containers need root")


def unique_name(label: str = "ct") -> str:
    return f"{RUN_PREFIX}-{label}{next(_counter)}"


def leftovers(name: str, veth: str) -> list[str]:
    """cgroups named after the container and its veth host end, if any remain."""
    root = Path("/sys/fs/cgroup")  # v2 (lxc.payload.NAME) or v1/hybrid (CONTROLLER/...)
    found = [str(p) for p in [*root.glob(f"lxc.*.{name}"), *root.glob(f"*/lxc.*.{name}")]]
    if Path(f"/sys/class/net/{veth}").exists():
        found.append(f"veth {veth}")
    return sorted(set(found))


def wait_no_leftovers(name: str, veth: str, limit_s: float = 10.0) -> list[str]:
    """LXC's monitor removes the cgroups as it exits; give it a moment, then report."""
    deadline = time.monotonic() + limit_s
    while (left := leftovers(name, veth)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture
def new_name() -> Callable[[str], str]:
    """A container name unique to this test run (``kkt<pid>-<label><n>``)."""
    return unique_name


@pytest.fixture
def lxcpath(tmp_path: Path, require_lxc: None) -> Path:
    return tmp_path / "lxc"


@pytest.fixture
def make_container(lxcpath: Path) -> Iterator[Callable[..., Container]]:
    """``make_container(label, network=..., create=True, start=False)`` -> Container;
    every container it made is destroyed at teardown and checked for leftovers."""
    made: list[Container] = []

    def make(
        label: str = "ct", *, network: str = "none", create: bool = True, start: bool = False
    ) -> Container:
        ct = Container(unique_name(label), lxcpath)
        made.append(ct)
        if create:
            ct.create("busybox", network=network)
        if start:
            ct.start()
        return ct

    yield make
    problems = []
    for ct in made:
        if ct.defined:
            try:
                ct.destroy(force=True)
            except ContainerError as exc:
                problems.append(f"{ct.name}: destroy failed: {exc}")
        problems += wait_no_leftovers(ct.name, ct.veth_name)
    assert not problems, f"left behind: {problems}"
