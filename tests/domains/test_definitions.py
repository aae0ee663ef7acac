"""Definitions, names, numbers and sizes: everything the domains layer checks before it
touches QEMU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmkit.cli import build_parser
from kvmkit.domains import Boot, Definition, DefinitionError, Disk, DomainStore, define
from kvmkit.domains.definition import check_finite, mib_from_bytes, validate_name
from kvmkit.qemu.errors import QemuError

MiB = 1 << 20


def _definition(name: str = "d", **values: object) -> Definition:
    return Definition(name, boot=Boot("kernel", "/k", "/i", "console=ttyS0"), **values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    ["", "a/b", "a\nb", "demo\n", ".hidden", "-x", "a b", "a\tb", "x" * 65, "caf\u00e9", "a\x00"],
)
def test_bad_names_get_one_line_errors(bad: str) -> None:
    with pytest.raises(DefinitionError) as info:
        validate_name(bad)
    assert "\n" not in str(info.value)


def test_good_names() -> None:
    for name in ("demo", "web-1", "a.b_c+d", "x" * 64, "9lives"):
        assert validate_name(name) == name


def test_definition_round_trips_through_its_documented_json() -> None:
    d = _definition(
        memory_mib=512,
        current_memory_mib=384,
        vcpus=2,
        max_vcpus=4,
        disks=[Disk("/a.qcow2", "vda"), Disk("/b.raw", "vdb", "raw", readonly=True)],
        autostart=True,
    )
    data = json.loads(json.dumps(d.to_json()))
    assert data["version"] == 1 and data["disks"][1]["target"] == "vdb"
    assert Definition.from_json(data) == d


@pytest.mark.parametrize(
    "change",
    [
        {"version": 2},
        {"memory_mib": 8},
        {"memory_mib": 1 << 40},
        {"memory_mib": 256.5},
        {"memory_mib": True},
        {"current_memory_mib": 1024},
        {"vcpus": 0},
        {"vcpus": 1000},
        {"max_vcpus": 0},
        {"machine": "isapc"},
        {"accel": "hvf"},
        {"autostart": "yes"},
        {"disks": [{"source": "rel.qcow2", "target": "vda"}]},
        {"disks": [{"source": "/a", "target": "sda"}]},
        {"disks": [{"source": "/a", "target": "vda", "format": "vmdk"}]},
        {"disks": [{"source": "/a", "target": "vda"}, {"source": "/b", "target": "vda"}]},
        {"disks": [{"source": "/a\n", "target": "vda"}]},
        {"boot": {"kind": "kernel", "kernel": "/k", "append": "a\nb"}},
        {"boot": {"kind": "disk", "kernel": "/k"}},
        {"nics": [{"model": "e1000"}]},
        {"unknown": 1},
    ],
)
def test_invalid_definitions_are_refused(change: dict[str, object]) -> None:
    data = {**_definition().to_json(), **change}
    with pytest.raises(DefinitionError):
        Definition.from_json(data)


def test_numbers_are_finite_and_in_range() -> None:
    for bad in (math.nan, math.inf, -math.inf, -1.0, 1e9):
        with pytest.raises(DefinitionError):
            check_finite(bad, "timeout", 0, 3600)
    assert check_finite(2, "timeout", 0, 3600) == 2.0
    with pytest.raises(DefinitionError, match="whole number of MiB"):
        mib_from_bytes(MiB + 1, "memory")
    with pytest.raises(DefinitionError, match="out of range"):
        mib_from_bytes(1 << 50, "memory")


def test_machine_config_maps_targets_to_nodes() -> None:
    d = _definition(memory_mib=512, current_memory_mib=300, disks=[Disk("/a.qcow2", "vdb")])
    config = d.machine_config()
    assert config.memory_mib == 512 and config.balloon
    assert [(x.path, x.node) for x in config.drives] == [("/a.qcow2", "vdb")]
    assert config.kernel == "/k" and config.initrd == "/i"
    assert Definition("x", boot=Boot("disk")).machine_config().kernel is None
    hot = _definition(hotplug_memory_mib=2048, memory_slots=2, max_vcpus=4).machine_config()
    assert (hot.maxmem_mib, hot.memory_slots, hot.maxcpus) == (2048, 2, 4)
    with pytest.raises(DefinitionError, match="hotplug memory"):
        _definition(memory_mib=512, hotplug_memory_mib=256, memory_slots=1).validate()


def test_definition_file_is_written_atomically_and_validated(tmp_path: Path) -> None:
    store = DomainStore(tmp_path)
    define(_definition("one"), store)
    folder = tmp_path / "vms" / "one"
    assert folder.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in folder.iterdir()] == ["definition.json"]  # no temp file left
    (folder / "definition.json").write_text('{"version": 1, "name": "one", "vcpus": -3')
    with pytest.raises(DefinitionError, match="not a valid definition"):
        store.load_definition("one")


# -- sizes on every `kvmkit vm` size option -------------------------------------------------

SIZE_OPTIONS = [
    (["vm", "start", "d", "--memory", "{}"], "memory"),
    (["vm", "define", "d", "--memory", "{}"], "memory"),
    (["vm", "start", "d", "--maxmem", "{}"], "maxmem"),
    (["vm", "define", "d", "--maxmem", "{}"], "maxmem"),
    (["vm", "setmem", "d", "{}"], "size"),
    (["vm", "setmaxmem", "d", "{}"], "size"),
    (["vm", "migrate", "d", "--bandwidth", "{}"], "bandwidth"),
]


@pytest.mark.parametrize(("argv", "dest"), SIZE_OPTIONS)
@pytest.mark.parametrize(
    ("text", "expected"),
    [("512M", 512 * MiB), ("512", 512 * MiB), ("1G", 1024 * MiB), ("1.5G", 1536 * MiB)],
)
def test_every_vm_size_option_takes_both_spellings(
    argv: list[str], dest: str, text: str, expected: int
) -> None:
    args = build_parser().parse_args([a.format(text) for a in argv])
    assert getattr(args, dest) == expected


@pytest.mark.parametrize(("argv", "dest"), SIZE_OPTIONS)
@pytest.mark.parametrize("bad", ["nan", "inf", "-1G", "1e400G", "12X", "0.3M"])
def test_every_vm_size_option_refuses_nonsense(
    argv: list[str], dest: str, bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([a.format(bad) for a in argv])
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the usage: one line
    assert last.startswith("kvmkit vm ") and "error:" in last


@pytest.mark.parametrize(
    "argv",
    [
        ["vm", "start", "d", "--cpus", "0"],
        ["vm", "start", "d", "--cpus", "nan"],
        ["vm", "start", "d", "--wait", "inf"],
        ["vm", "start", "d", "--wait", "-1"],
        ["vm", "shutdown", "d", "--timeout", "nan"],
        ["vm", "console", "d", "--timeout", "1e999"],
        ["vm", "migrate", "d", "--downtime-limit", "-5"],
        ["vm", "setmem", "d", "8M"],
    ],
)
def test_vm_numbers_are_checked(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)


def test_option_strings_escape_commas() -> None:
    from kvmkit.qemu.config import opt_value

    assert opt_value("/d/real.img,locking=off") == "/d/real.img,,locking=off"
    with pytest.raises(QemuError):
        opt_value("/d/a\nb")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_fields = st.fixed_dictionaries(
    {"version": st.just(1), "name": st.sampled_from(["d", "a/b", "x\n"])},
    optional={
        k: _json
        for k in ("memory_mib", "current_memory_mib", "vcpus", "machine", "boot", "disks", "nics")
    },
)


@settings(max_examples=300, deadline=None)
@given(_json | _fields)
def test_any_json_is_a_valid_definition_or_a_definition_error(data: object) -> None:
    try:
        definition = Definition.from_json(data)
    except DefinitionError as exc:
        assert "\n" not in str(exc)
        return
    assert Definition.from_json(json.loads(json.dumps(definition.to_json()))) == definition
