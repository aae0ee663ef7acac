"""Live migration of a whole running machine (``Machine.migrate``/``Machine.incoming``,
``kvmkit run --migrate-to``/``--incoming``), checked against an uninterrupted run of the
``dirty`` guest.  The 10 random moments run in this one process (the baseline of each
configuration reused); the seed is printed.  One migration crosses two network
namespaces made here (a veth pair, 10.231.77.0/30), removed whatever happens."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmkit.kvm import Kvm
from kvmkit.runner.machine import Machine, RunConfig, run_guest

MiB, GiB = 1 << 20, 1 << 30
CONFIGS = [(1, 64 * MiB), (4, 64 * MiB), (1, 1 * GiB), (4, 1 * GiB)]
MOMENTS = 10
ARGS = "ticks=100 rate=256 mem=16"
SEED = int(os.environ.get("KVMKIT_MIGRATION_SEED", "7"))


def _config(image: Path, vcpus: int, mem: int) -> RunConfig:
    return RunConfig(image=image, append=ARGS, vcpus=vcpus, mem_size=mem, echo=None)


@pytest.fixture(scope="module")
def kvm(require_kvm: None) -> Iterator[Kvm]:
    with Kvm() as k:
        yield k


def _migrate_once(
    kvm: Kvm, image: Path, vcpus: int, mem: int, at: float, addr: str
) -> tuple[str, int | None, dict[str, Any]]:
    """Console (source then destination) and exit code of a run migrated ``at`` s in."""
    dest: dict[str, Any] = {}
    listening = threading.Event()

    def destination() -> None:
        try:
            m, _ = Machine.incoming(addr, kvm=kvm, echo=None, timeout=30, ready=listening.set)
            with m:
                dest["result"] = m.run()
        except BaseException as exc:  # reported by the main thread
            dest["error"] = exc
            listening.set()

    t = threading.Thread(target=destination)
    t.start()
    listening.wait(30)
    stats: dict[str, Any] = {}

    def act(machine: Machine) -> tuple[str, str] | None:
        from kvmkit.runner.migration import MigrationError

        try:
            stats.update(machine.migrate(addr, downtime_ms=50).to_dict())
        except MigrationError as exc:  # only because the guest ended meanwhile
            assert "ended" in str(exc), exc
            return None
        return "migrated", ""

    try:
        src = run_guest(_config(image, vcpus, mem), kvm=kvm, action=(at, act), dirty_tracking=True)
    finally:
        if not stats:  # the guest ended first: nobody will connect
            with socket.socket(socket.AF_UNIX) as s, contextlib.suppress(OSError):
                s.connect(addr[5:])
        t.join(60)
    if src.reason != "migrated":
        assert "result" not in dest  # the destination never ran a guest
        return src.console, src.exit_code, {}
    assert "error" not in dest, dest.get("error")
    r = dest["result"]
    return src.console + r.console, r.exit_code, stats


def test_live_migration_at_10_random_moments_gives_the_uninterrupted_result(
    kvm: Kvm, guest_image, tmp_path: Path
) -> None:
    image = guest_image("dirty")
    rng = random.Random(SEED)
    print(f"seed {SEED}", file=sys.stderr)
    bases = {}
    migrated = 0
    for n in range(MOMENTS):
        vcpus, mem = CONFIGS[n % len(CONFIGS)]
        if (vcpus, mem) not in bases:
            b = run_guest(_config(image, vcpus, mem), kvm=kvm)
            assert (b.reason, b.exit_code) == ("exit", 0)
            bases[vcpus, mem] = b.console
        at = rng.uniform(0.02, 0.6)  # a migration takes 0.1-0.4 s of the 1 s run
        console, code, stats = _migrate_once(
            kvm, image, vcpus, mem, at, f"unix:{tmp_path}/mig{n}.sock"
        )
        assert (console, code) == (bases[vcpus, mem], 0), (vcpus, mem, at)
        if stats:
            migrated += 1
            assert stats["rounds"] >= 2 and stats["pages_per_round"][0] == mem // 4096
    assert migrated >= MOMENTS - 2


def test_source_keeps_running_when_the_destination_dies_mid_stream(
    kvm: Kvm, guest_image, tmp_path: Path
) -> None:
    """A destination that reads 1 MiB and goes away: the source says why and the guest
    runs to its normal end here."""
    image = guest_image("dirty")
    base = run_guest(_config(image, 1, 64 * MiB), kvm=kvm)
    path = str(tmp_path / "dies.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)

    def dying() -> None:
        conn, _ = listener.accept()
        got = 0
        while got < 1 << 20:
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            got += len(chunk)
        conn.close()

    t = threading.Thread(target=dying)
    t.start()
    errors: list[str] = []

    def act(machine: Machine) -> None:
        from kvmkit.runner.migration import MigrationError

        try:
            machine.migrate(f"unix:{path}")
        except MigrationError as exc:
            errors.append(str(exc))
        return None

    try:
        r = run_guest(_config(image, 1, 64 * MiB), kvm=kvm, action=(0.3, act), dirty_tracking=True)
    finally:
        t.join(30)
        listener.close()
    assert errors and "destination" in errors[0]
    assert (r.reason, r.exit_code, r.console) == ("exit", 0, base.console)


def _kvmkit(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvmkit", *args]


def test_cli_migration_fails_cleanly_with_no_destination(tmp_path: Path) -> None:
    p = subprocess.run(
        _kvmkit(
            "run", "dirty", "--migrate-to", f"unix:{tmp_path}/none.sock", "--migrate-after", "0.2"
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "migration failed, the guest keeps running here" in p.stderr
    assert "checksum 0x" in p.stdout


# ---- two network namespaces ---------------------------------------------------------------

NS = (f"kk-mig-src-{os.getpid()}", f"kk-mig-dst-{os.getpid()}")
#: 3 s of guest: the migration starts at 0.3 s and has time to finish on a loaded host.
LONG = "ticks=300"
ADDRS = ("10.231.77.1", "10.231.77.2")


@pytest.fixture
def netns_pair() -> Iterator[tuple[str, str]]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make network namespaces")
    src, dst = NS
    try:
        for cmd in (
            ["ip", "netns", "add", src],
            ["ip", "netns", "add", dst],
            [
                "ip",
                "link",
                "add",
                "kkmig0",
                "netns",
                src,
                "type",
                "veth",
                "peer",
                "name",
                "kkmig1",
                "netns",
                dst,
            ],
            ["ip", "-n", src, "addr", "add", f"{ADDRS[0]}/30", "dev", "kkmig0"],
            ["ip", "-n", dst, "addr", "add", f"{ADDRS[1]}/30", "dev", "kkmig1"],
            ["ip", "-n", src, "link", "set", "kkmig0", "up"],
            ["ip", "-n", dst, "link", "set", "kkmig1", "up"],
            ["ip", "-n", src, "link", "set", "lo", "up"],
            ["ip", "-n", dst, "link", "set", "lo", "up"],
        ):
            subprocess.run(cmd, check=True, capture_output=True, timeout=30)
        yield src, dst
    finally:
        for ns in NS:  # deleting a namespace deletes its end of the veth pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def test_migration_between_two_network_namespaces(
    netns_pair: tuple[str, str], guest_image, tmp_path: Path
) -> None:
    src, dst = netns_pair
    guest_image("dirty")  # built before either process starts
    base = subprocess.run(
        _kvmkit("run", "dirty", "--append", LONG, "--json"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    addr = f"tcp:{ADDRS[1]}:47123"
    dest = subprocess.Popen(
        ["ip", "netns", "exec", dst, *_kvmkit("run", "--incoming", addr, "--json")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until it listens
            ss = subprocess.run(
                ["ip", "netns", "exec", dst, "ss", "-ltn"], capture_output=True, text=True
            )
            if ":47123" in ss.stdout:
                break
            time.sleep(0.1)
        source = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                src,
                *_kvmkit(
                    "run",
                    "dirty",
                    "--append",
                    LONG,
                    "--migrate-to",
                    addr,
                    "--migrate-after",
                    "0.3",
                    "--json",
                ),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        out, err = dest.communicate(timeout=120)
    finally:
        if dest.poll() is None:
            dest.kill()
            dest.wait()
    assert source.returncode == 0, source.stderr
    sdoc = json.loads(source.stdout)
    assert sdoc["reason"] == "migrated", source.stderr
    assert sdoc["migration"]["rounds"] >= 2 and sdoc["migration"]["downtime_ms"] > 0
    assert dest.returncode == 0, err
    ddoc = json.loads(out)
    assert sdoc["console"] + ddoc["console"] == json.loads(base.stdout)["console"]


def test_a_destination_process_is_returned_once_it_listens(tmp_path: Path) -> None:
    from kvmkit.runner.migration import MigrationError, connect
    from kvmkit.runner.migration.destination import start_destination

    addr = f"unix:{tmp_path / 'dest.sock'}"
    dest = start_destination(addr, args=("--incoming-timeout", "30"))
    try:
        connect(addr, timeout=10).close()  # it listens: a source that says nothing
        err = dest.communicate(timeout=60)[1].decode()
    finally:
        if dest.poll() is None:
            dest.kill()
            dest.wait()
    assert dest.returncode not in (0, None) and "before its header" in err, err
    with pytest.raises(MigrationError, match="did not listen: .*cannot listen"):
        start_destination(f"unix:{tmp_path / 'no-such-dir' / 'dest.sock'}")
