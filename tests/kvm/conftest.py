from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvmkit.kvm import Kvm, Vm


@pytest.fixture
def kvm(require_kvm: None) -> Iterator[Kvm]:
    with Kvm() as k:
        yield k


@pytest.fixture
def vm(kvm: Kvm) -> Iterator[Vm]:
    with kvm.create_vm() as v:
        yield v
