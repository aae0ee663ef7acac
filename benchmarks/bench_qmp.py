"""QMP round-trip rates: a raw blocking socket, qemu.qmp's asyncio client and kvmkit.qmp.

One paused QEMU (``-S -machine none``) with one QMP socket per client; each client runs
``query-status`` sequentially (one in flight) and pipelined (8 in flight), in rounds that
interleave the clients so machine noise hits them alike.  Rates are medians over rounds.

Same work, same semantics: qemu.qmp puts an id on every command, so it is compared with
kvmkit ``ids=True`` and with a raw socket that sends ids too; kvmkit's default (in-band
commands without ids, replies matched in order) is compared with a raw socket without ids.
Targets: kvmkit >= 0.9x the raw socket and >= 1.3x qemu.qmp.

Cross-check: each client also runs N1 and N2 commands timed as a whole (connect, greeting,
negotiation and close included); ``(N2 - N1) / (T(N2) - T(N1))`` is the same rate measured
without the in-loop timer.

Run alone: ``python -m benchmarks.bench_qmp [--quick]``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import trio
from qemu.qmp import QMPClient as UpstreamClient

from benchmarks.common import Result, Skip
from benchmarks.report import print_results
from kvmkit.qmp import open_qmp

TITLE = "QMP round trips: raw socket vs qemu.qmp vs kvmkit.qmp"

WINDOW = 8  # commands in flight when pipelined
COMMAND = "query-status"


@contextmanager
def paused_qemu(sockets: int) -> Iterator[list[Path]]:
    """A paused QEMU with ``sockets`` QMP sockets; killed by PID and its dir removed."""
    binary = shutil.which("qemu-system-x86_64")
    if binary is None:
        raise Skip("qemu-system-x86_64 is not installed")
    tmp = Path(tempfile.mkdtemp(prefix="kvmkit-bench-qmp-"))
    paths = [tmp / f"qmp{i}.sock" for i in range(sockets)]
    args = [binary, "-S", "-display", "none", "-nodefaults", "-machine", "none"]
    args += ["-accel", "tcg"]
    for path in paths:
        args += ["-qmp", f"unix:{path},server=on,wait=off"]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while not all(p.exists() for p in paths):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU did not start: {proc.stderr.read()!r}")  # type: ignore[union-attr]
            time.sleep(0.01)
        yield paths
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()
        shutil.rmtree(tmp, ignore_errors=True)


# -- raw blocking socket ---------------------------------------------------------------

#: A client function runs ``n`` commands on the socket at ``path`` and returns (seconds of
#: the command loop, seconds of the whole call: connect to close).
Client = Callable[[Path, int], tuple[float, float]]


class RawClient:
    """The least a QMP client can do: blocking socket, no parsing beyond line splitting."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.buf = b""
        self.readline()  # greeting
        self.sock.sendall(b'{"execute":"qmp_capabilities"}\n')
        self.readline()

    def readline(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QEMU closed the socket")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def close(self) -> None:
        self.sock.close()


def _raw_request(i: int, ids: bool) -> bytes:
    return json.dumps({"execute": COMMAND, **({"id": i} if ids else {})}).encode() + b"\n"


def _raw_reply(client: RawClient, i: int, ids: bool) -> None:
    reply = json.loads(client.readline())
    if ids and reply.get("id") != i:
        raise RuntimeError(f"raw socket: reply {reply!r} does not answer command {i}")


def raw(path: Path, n: int, *, ids: bool, window: int) -> tuple[float, float]:
    """``n`` commands with up to ``window`` in flight; replies checked (by id with ids)."""
    begin = time.perf_counter()
    client = RawClient(path)
    try:
        start = time.perf_counter()
        sent = 0
        for _ in range(min(window, n)):
            client.sock.sendall(_raw_request(sent, ids))
            sent += 1
        for i in range(n):
            _raw_reply(client, i, ids)
            if sent < n:
                client.sock.sendall(_raw_request(sent, ids))
                sent += 1
        loop = time.perf_counter() - start
    finally:
        client.close()
    return loop, time.perf_counter() - begin


# -- qemu.qmp (asyncio; ids on every command) -----------------------------------------


def upstream(path: Path, n: int, *, window: int) -> tuple[float, float]:
    async def main() -> float:
        qmp = UpstreamClient("bench")
        await qmp.connect(str(path))

        async def worker(count: int) -> None:
            for _ in range(count):
                await qmp.execute(COMMAND)

        try:
            start = time.perf_counter()
            await asyncio.gather(*(worker(n // window) for _ in range(window)))
            return time.perf_counter() - start
        finally:
            await qmp.disconnect()

    begin = time.perf_counter()
    loop = asyncio.run(main())
    return loop, time.perf_counter() - begin


# -- kvmkit.qmp (trio) -----------------------------------------------------------------


def kvmkit(path: Path, n: int, *, ids: bool, window: int) -> tuple[float, float]:
    async def main() -> float:
        async with open_qmp(path, ids=ids) as qmp:

            async def worker(count: int) -> None:
                for _ in range(count):
                    await qmp.execute(COMMAND)

            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(window):
                    nursery.start_soon(worker, n // window)
            return time.perf_counter() - start

    begin = time.perf_counter()
    loop = trio.run(main)
    return loop, time.perf_counter() - begin


def _cases() -> dict[str, Client]:
    cases: dict[str, Client] = {}
    for mode, window in (("sequential", 1), ("pipelined", WINDOW)):
        cases[f"raw socket, no ids, {mode}"] = functools.partial(raw, ids=False, window=window)
        cases[f"raw socket, ids, {mode}"] = functools.partial(raw, ids=True, window=window)
        cases[f"qemu.qmp (ids), {mode}"] = functools.partial(upstream, window=window)
        cases[f"kvmkit ids=True, {mode}"] = functools.partial(kvmkit, ids=True, window=window)
        cases[f"kvmkit (no ids), {mode}"] = functools.partial(kvmkit, ids=False, window=window)
    return cases


CASES = _cases()

#: (case, its baseline, target) for every printed figure, per mode
COMPARISONS = (
    ("kvmkit ids=True", "qemu.qmp (ids)", ">= 1.3x"),
    ("kvmkit ids=True", "raw socket, ids", ">= 0.9x"),
    ("kvmkit (no ids)", "raw socket, no ids", ">= 0.9x"),
    ("qemu.qmp (ids)", "raw socket, ids", None),
)


def measure(quick: bool = False) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Rates per case (commands/s over rounds) and each case's cross-check rate."""
    n1, n2 = (200, 600) if quick else (500, 2500)
    rounds = 2 if quick else 5
    n2 -= n2 % WINDOW
    n1 -= n1 % WINDOW
    samples: dict[str, list[float]] = {case: [] for case in CASES}
    totals: dict[tuple[str, int], list[float]] = {(c, n): [] for c in CASES for n in (n1, n2)}
    with paused_qemu(sockets=len(CASES)) as paths:
        for case, path in zip(CASES, paths, strict=True):
            CASES[case](path, 5 * WINDOW)  # warm-up: imports, first connection
        for _ in range(rounds):
            for case, path in zip(CASES, paths, strict=True):
                for n in (n1, n2):
                    loop, total = CASES[case](path, n)
                    totals[case, n].append(total)
                    if n == n2:
                        samples[case].append(n / loop)
    checks = {
        case: (n2 - n1)
        / (statistics.median(totals[case, n2]) - statistics.median(totals[case, n1]))
        for case in CASES
    }
    return samples, checks


def run(quick: bool = False) -> list[Result]:
    samples, checks = measure(quick)
    rate = {case: statistics.median(values) for case, values in samples.items()}
    results: list[Result] = []
    for mode in ("sequential", "pipelined"):
        for ours, base, target in COMPARISONS:
            case, baseline = f"{ours}, {mode}", f"{base}, {mode}"
            results.append(
                Result(
                    benchmark="qmp",
                    case=f"{case} / {base}",  # unique per row, for --compare
                    value=rate[case],
                    unit="commands/s",
                    baseline_case=baseline,
                    baseline=rate[baseline],
                    higher_is_better=True,
                    target=target,
                    check=checks[case],
                    check_method="whole calls, N2 - N1 commands",
                    extra={
                        "samples": [round(s) for s in samples[case]],
                        "baseline_samples": [round(s) for s in samples[baseline]],
                        "in_flight": 1 if mode == "sequential" else WINDOW,
                    },
                )
            )
    return results


def main(argv: list[str]) -> int:
    print(TITLE)
    print_results(run(quick="--quick" in argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
