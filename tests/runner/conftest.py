from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from kvmkit import guests
from kvmkit.runner.machine import RunConfig, RunResult, run_guest


@pytest.fixture(scope="session")
def guest_image(require_kvm: None) -> Callable[[str], Path]:
    """Build (once, cached) and return the path of a bundled guest program."""
    return guests.build_guest


@pytest.fixture
def run_image(require_kvm: None) -> Callable[..., RunResult]:
    """Run an image under the runner without echoing its console; keyword arguments are
    :class:`RunConfig` fields."""

    def _run(image: Path, **kw: object) -> RunResult:
        kw.setdefault("timeout", 120.0)
        return run_guest(RunConfig(image=image, echo=None, **kw))  # type: ignore[arg-type]

    return _run
