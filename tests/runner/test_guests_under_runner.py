"""Every bundled guest program under the runner, with the C fast path and with the Python
loop: console output, exit status and exit counts, and both loops agreeing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from kvmkit.guests import IO_STORM_PORT, MMIO_STORM_ADDR
from kvmkit.runner.machine import RunResult

LOOPS = [pytest.param(False, id="c-fastpath"), pytest.param(True, id="python-loop")]
RunImage = Callable[..., RunResult]
GuestImage = Callable[[str], Path]


@pytest.mark.parametrize("python_loop", LOOPS)
def test_hello(guest_image: GuestImage, run_image: RunImage, python_loop: bool) -> None:
    r = run_image(guest_image("hello"), python_loop=python_loop)
    assert (r.reason, r.exit_code, r.process_status) == ("exit", 0, 0)
    assert r.console == "Hello from kvmkit guest\n"
    assert r.stats.ports[0xE9] == len(r.console)
    assert r.stats.ports[0xF4] == 1
    assert [m.label for m in r.stats.marks][:1] == ["entry"]
    assert r.stats.kvm_run_calls == r.stats.total_exits


@pytest.mark.parametrize("python_loop", LOOPS)
@pytest.mark.parametrize("cpl", [0, 3])
def test_io_storm_counts_every_port_write(
    guest_image: GuestImage, run_image: RunImage, python_loop: bool, cpl: int
) -> None:
    n = 300
    r = run_image(guest_image("io-storm"), python_loop=python_loop, append=f"n={n} cpl={cpl}")
    assert (r.reason, r.exit_code) == ("exit", 0), r.console
    assert r.stats.ports[IO_STORM_PORT] == n
    assert r.stats.unclaimed["port", IO_STORM_PORT] == n
    assert r.stats.exits["io_out"] >= n


@pytest.mark.parametrize("python_loop", LOOPS)
def test_mmio_storm_counts_every_mmio_exit(
    guest_image: GuestImage, run_image: RunImage, python_loop: bool
) -> None:
    n = 200
    r = run_image(guest_image("mmio-storm"), python_loop=python_loop, append=f"n={n}")
    assert (r.reason, r.exit_code) == ("exit", 0), r.console
    assert r.stats.exits["mmio_write"] >= n
    assert r.stats.mmio[MMIO_STORM_ADDR] >= n


@pytest.mark.parametrize("python_loop", LOOPS)
def test_compute_at_cpl3_counts_primes(
    guest_image: GuestImage, run_image: RunImage, python_loop: bool
) -> None:
    r = run_image(guest_image("compute"), python_loop=python_loop, append="n=1000000")
    assert (r.reason, r.exit_code) == ("exit", 0), r.console
    assert "78498" in r.console  # primes below 10^6


def test_compute_at_cpl0(guest_image: GuestImage, run_image: RunImage) -> None:
    r = run_image(guest_image("compute"), append="n=2000 cpl=0")
    assert (r.reason, r.exit_code) == ("exit", 0), r.console
    assert "303" in r.console  # primes below 2000


@pytest.mark.parametrize("vcpus", [2, 4])
def test_smp_starts_every_cpu_with_init_sipi(
    guest_image: GuestImage, run_image: RunImage, vcpus: int
) -> None:
    r = run_image(guest_image("smp"), vcpus=vcpus, mem_size=64 << 20)
    assert (r.reason, r.exit_code) == ("exit", 0), r.console
    for cpu in range(vcpus):  # CPUs number themselves in the order they come up
        assert f"cpu {cpu} up (apic id " in r.console
    assert "apic ids: " + " ".join(str(i) for i in range(vcpus)) in r.console  # one LAPIC id each
    assert f"all {vcpus} cpus up" in r.console


def test_both_loops_give_identical_output_and_statistics(
    guest_image: GuestImage, run_image: RunImage
) -> None:
    image = guest_image("io-storm")
    fast = run_image(image, append="n=100", python_loop=False)
    slow = run_image(image, append="n=100", python_loop=True)
    assert fast.console == slow.console
    # The machine's idle probes kick vCPUs at host-chosen moments (more of them on a
    # loaded host): those ``interrupted`` returns are the host's, not the guest's.
    kicks_fast = fast.stats.exits.get("interrupted", 0)
    kicks_slow = slow.stats.exits.get("interrupted", 0)
    guest_exits = {k: v for k, v in fast.stats.exits.items() if k != "interrupted" and v}
    assert guest_exits == {k: v for k, v in slow.stats.exits.items() if k != "interrupted" and v}
    assert fast.stats.ports == slow.stats.ports
    assert fast.stats.kvm_run_calls - kicks_fast == slow.stats.kvm_run_calls - kicks_slow
    assert [m.label for m in fast.stats.marks] == [m.label for m in slow.stats.marks]
