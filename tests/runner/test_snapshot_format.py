"""The snapshot manifest reader under arbitrary and mutated input: it returns a valid
manifest or raises SnapshotError — never another exception."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmkit.kvm.cpuid import CpuidEntry
from kvmkit.kvm.state import REG_NAMES, VcpuState, VmState
from kvmkit.runner.snapshot import Manifest, MemoryRegion, SnapshotError, parse_manifest
from kvmkit.runner.snapshot.format import capabilities_needed


def _valid_manifest(vcpus: int = 2) -> Manifest:
    states = [
        VcpuState(
            index=i,
            mp_state=0,
            regs={r: n for n, r in enumerate(REG_NAMES)},
            sregs_kind="sregs2",
            sregs=bytes(range(200)),
            xsave=bytes(4096),
            fpu=b"",
            xcrs=bytes(392),
            debugregs=bytes(128),
            events=bytes(64),
            msrs={0x10: 12345, 0x6E0: 0},
            lapic=bytes(1024),
            tsc_khz=2_000_000,
            cpuid=[CpuidEntry(1, 0, 0, 1, 2, 3, 4)],
        )
        for i in range(vcpus)
    ]
    vm = VmState(clock_ns=10**9, irqchip={"pic_master": bytes(520)}, pit2=bytes(112))
    return Manifest(
        vcpus=states,
        vm=vm,
        memory=[
            MemoryRegion(0, 0x100000, "memory-0.bin", "0" * 64),
            MemoryRegion(0x400000, 0x400000, "memory-1.bin", "a" * 64),
        ],
        devices={"uart": {"lcr": 3, "fifo": [1, 2]}},
        machine={"mode": "long"},
        capabilities=capabilities_needed(states, vm),
        kvmkit_version="0.1.0",
    )


VALID = _valid_manifest().to_json()


def _check(data: bytes, **kw: Any) -> None:
    try:
        parse_manifest(data, **kw)
    except SnapshotError as exc:
        assert str(exc)  # a one-line message


def test_valid_manifest_round_trips() -> None:
    m = parse_manifest(VALID, host_caps=set(_valid_manifest().capabilities), expect_vcpus=2)
    assert m.to_json() == VALID
    assert m.vcpus == _valid_manifest().vcpus


@pytest.mark.parametrize("cut", [1, 10, len(VALID) // 2, len(VALID) - 1])
def test_truncated_manifest(cut: int) -> None:
    with pytest.raises(SnapshotError, match="truncated"):
        parse_manifest(VALID[:cut])


def test_wrong_vcpu_count_and_missing_capability() -> None:
    with pytest.raises(SnapshotError, match="has 2 vCPUs; this machine has 1"):
        parse_manifest(VALID, expect_vcpus=1)
    with pytest.raises(SnapshotError, match="DEBUGREGS, which this host lacks"):
        parse_manifest(VALID, host_caps={"IRQCHIP"})


def test_overlapping_regions_and_bad_file_names() -> None:
    doc = json.loads(VALID)
    doc["memory"][1]["guest_phys"] = 0x80000
    with pytest.raises(SnapshotError, match="overlap"):
        parse_manifest(json.dumps(doc).encode())
    doc = json.loads(VALID)
    doc["memory"][0]["file"] = "../../etc/passwd"
    with pytest.raises(SnapshotError, match="memory-N.bin"):
        parse_manifest(json.dumps(doc).encode())


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.binary(max_size=512))
def test_arbitrary_bytes(data: bytes) -> None:
    _check(data)


@given(JSON)
def test_arbitrary_json(value: Any) -> None:
    _check(json.dumps(value).encode())


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            out += _paths(v, prefix + (i,))
    return out


DOC = json.loads(VALID)
PATHS = [p for p in _paths(DOC) if p]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PATHS), JSON, st.booleans())
def test_mutated_manifest(path: tuple[Any, ...], value: Any, delete: bool) -> None:
    doc = json.loads(VALID)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    _check(json.dumps(doc).encode(), host_caps=set(DOC["capabilities"]), expect_vcpus=2)


@settings(max_examples=200)
@given(st.integers(0, len(VALID) - 1), st.integers(0, 255))
def test_flipped_byte(pos: int, byte: int) -> None:
    data = bytearray(VALID)
    data[pos] = byte
    _check(bytes(data))
