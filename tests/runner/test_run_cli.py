"""``kvmkit run`` as a user meets it: exit statuses, one-line errors, --strict, --timeout,
--json, a triple fault reported with the registers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvmkit.guests import IO_STORM_PORT


def kvmkit(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmkit", *args],
        stdin=subprocess.DEVNULL,  # not a terminal or pipe: nothing is forwarded to COM1
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def flat(tmp_path: Path, code: bytes) -> str:
    path = tmp_path / "guest.bin"
    path.write_bytes(code)
    return str(path)


@pytest.fixture(autouse=True)
def _kvm(require_kvm: None) -> None:
    pass


def test_json_output_has_the_documented_keys() -> None:
    proc = kvmkit("run", "hello", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert {
        "exit_code",
        "console",
        "exits",
        "kvm_run_calls",
        "time_in_guest_s",
        "time_in_vmm_s",
        "marks",
    } <= set(out)
    assert out["exit_code"] == 0 and out["console"] == "Hello from kvmkit guest\n"
    # every KVM_RUN ended in the guest's port writes, or in an idle-probe kick
    assert out["exits"]["io_out"] + out["exits"].get("interrupted", 0) == out["kvm_run_calls"]
    assert [m["label"] for m in out["marks"]][0] == "entry"


def test_stats_go_to_stderr_and_console_to_stdout() -> None:
    proc = kvmkit("run", "hello", "--stats")
    assert proc.returncode == 0
    assert proc.stdout == "Hello from kvmkit guest\n"
    assert "exits by reason:" in proc.stderr and "KVM_RUN calls" in proc.stderr


@pytest.mark.parametrize(
    ("content", "fault"),
    [
        (b"", "empty"),
        (b"\x7fELF\x02\x01\x01", "truncated"),
    ],
)
def test_a_malformed_image_is_one_line_and_status_2(
    tmp_path: Path, content: bytes, fault: str
) -> None:
    bad = tmp_path / "bad.img"
    bad.write_bytes(content)
    proc = kvmkit("run", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and str(bad) in proc.stderr and fault in proc.stderr.lower()
    assert "Traceback" not in proc.stderr


def test_missing_image_is_status_2(tmp_path: Path) -> None:
    proc = kvmkit("run", str(tmp_path / "nope.elf"))
    assert proc.returncode == 2 and "nope.elf" in proc.stderr and "Traceback" not in proc.stderr


def test_strict_makes_an_unclaimed_port_an_error_naming_port_and_rip() -> None:
    lenient = kvmkit("run", "io-storm", "--append", "n=10")
    assert lenient.returncode == 0
    strict = kvmkit("run", "io-storm", "--append", "n=10", "--strict")
    assert strict.returncode == 3
    assert f"port {IO_STORM_PORT:#x}" in strict.stderr and "RIP 0x" in strict.stderr
    assert "Traceback" not in strict.stderr


def test_timeout_kicks_a_spinning_guest_and_reports_where_it_was(tmp_path: Path) -> None:
    spin = tmp_path / "spin.bin"
    spin.write_bytes(bytes([0xEB, 0xFE]))  # 1: jmp 1b
    proc = kvmkit(
        "run",
        str(spin),
        "--load-addr",
        "0x100000",
        "--cpl",
        "3",
        "--timeout",
        "0.5",
        "--vcpus",
        "1",
    )
    assert proc.returncode == 124
    assert "timeout" in proc.stderr
    assert "vcpu 0: long mode, CPL 3, RIP 0x100000" in proc.stderr


def test_smp_guest_with_timeout_while_aps_wait(tmp_path: Path) -> None:
    spin = tmp_path / "spin.bin"
    spin.write_bytes(bytes([0xEB, 0xFE]))
    # APs never get a SIPI: they sit in KVM_RUN waiting; the timeout must still end the run
    proc = kvmkit(
        "run",
        str(spin),
        "--load-addr",
        "0x100000",
        "--timeout",
        "0.5",
        "--vcpus",
        "2",
        "--cpl",
        "3",
    )
    assert proc.returncode == 124
    assert "vcpu 1:" in proc.stderr


def test_triple_fault_is_reported_with_registers(tmp_path: Path) -> None:
    crash = tmp_path / "crash.bin"
    crash.write_bytes(bytes([0x48, 0xC7, 0xC0, 0x2A, 0, 0, 0, 0x0F, 0x0B]))  # mov rax, 42; ud2
    proc = kvmkit("run", str(crash), "--load-addr", "0x100000")
    assert proc.returncode == 125
    assert "triple fault" in proc.stderr
    assert "rax=0x000000000000002a" in proc.stderr and "rip=0x0000000000100007" in proc.stderr


def test_bad_option_combinations_are_clear_errors() -> None:
    proc = kvmkit("run", "hello", "--cpl", "3")
    assert proc.returncode != 0 and "multiboot images start at CPL 0" in proc.stderr
    proc = kvmkit("run", "hello", "--mode", "long")
    assert proc.returncode != 0 and "starts in protected mode" in proc.stderr


@pytest.mark.parametrize(
    ("value", "status"), [(0, 0), (1, 1), (255, 255), (256, 255), (0xFFFFFFFF, 255)]
)
def test_exit_value_is_32_bit_and_never_becomes_status_0(
    tmp_path: Path, value: int, status: int
) -> None:
    # mov eax, value; out 0xf4, eax
    image = flat(tmp_path, bytes([0xB8]) + value.to_bytes(4, "little") + bytes([0xE7, 0xF4]))
    proc = kvmkit("run", image, "--load-addr", "0x100000", "--json")
    assert proc.returncode == status, proc.stderr
    assert json.loads(proc.stdout)["exit_code"] == value


def test_console_limit_keeps_the_last_bytes_and_streams_all(tmp_path: Path) -> None:
    # for ecx = 3000: out 0xe9, 'a'..; then 'Z'; exit 0
    code = (
        bytes([0xB9]) + (3000).to_bytes(4, "little")  # mov ecx, 3000
        + bytes([0xB0, 0x61, 0xE6, 0xE9, 0xE2, 0xFA])  # 1: mov al,'a'; out 0xe9,al; loop 1b
        + bytes([0xB0, 0x5A, 0xE6, 0xE9, 0x31, 0xC0, 0xE7, 0xF4])  # 'Z'; xor eax,eax; out
    )  # fmt: skip
    proc = kvmkit("run", flat(tmp_path, code), "--load-addr", "0x100000", "--json",
                  "--console-limit", "1K")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["console"] == "a" * 1023 + "Z" and out["console_dropped_bytes"] == 3001 - 1024
    assert proc.stderr.count("a") == 3000  # the echo (stderr with --json) got every byte
    bad = kvmkit("run", "hello", "--console-limit", "lots")
    assert bad.returncode == 2 and "--console-limit" in bad.stderr


def test_a_closed_stdout_does_not_fail_the_run() -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "kvmkit", "run", "hello"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # the reader is gone before the guest prints
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 0, err
    assert "BrokenPipe" not in err and "thread failed" not in err


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf"])
def test_a_timeout_that_is_not_a_positive_finite_number_is_refused(timeout: str) -> None:
    proc = kvmkit("run", "hello", "--timeout", timeout)
    assert proc.returncode != 0 and "timeout" in proc.stderr and "Traceback" not in proc.stderr


def test_an_emulation_failure_names_the_suberror_the_bytes_and_the_mode(tmp_path: Path) -> None:
    # CPL 0 long mode: a VMX instruction (vmcall would be a hypercall); 0f 01 c4 = vmfunc,
    # which KVM's emulator does not emulate for the guest.  If this backend handles it
    # some other way the test says how.
    code = bytes([0x0F, 0x01, 0xC4, 0x31, 0xC0, 0xE7, 0xF4])
    proc = kvmkit("run", flat(tmp_path, code), "--load-addr", "0x100000", "--timeout", "30")
    if "KVM internal error" not in proc.stderr:
        pytest.skip(f"this KVM does not stop on vmfunc: status {proc.returncode}, {proc.stderr!r}")
    assert proc.returncode == 125
    assert "EMULATION" in proc.stderr and "long mode, CPL 0" in proc.stderr
    assert "bytes 0f 01 c4" in proc.stderr
