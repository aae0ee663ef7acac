"""QMP round-trip rates: a raw blocking socket, qemu.qmp's asyncio client and kvmkit.qmp.

One paused QEMU (``-S -machine none``) with one QMP socket per client; each client runs
``query-status`` sequentially (one in flight) and pipelined (8 in flight), in rounds that
interleave the clients so machine noise hits them alike.  Rates are medians over rounds.
Targets: kvmkit >= 0.9x the raw socket and >= 1.3x qemu.qmp.

Run alone: ``python -m benchmarks.bench_qmp [--quick]``.
"""

from __future__ import annotations

import asyncio
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

from benchmarks.common import Result
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
        raise RuntimeError("qemu-system-x86_64 is not installed")
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


class RawClient:
    """The least a QMP client can do: blocking socket, no parsing beyond line splitting."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.buf = b""
        self.readline()  # greeting
        self.sock.sendall(b'{"execute":"qmp_capabilities"}\n')
        assert b"return" in self.readline()

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


def raw_sequential(path: Path, n: int) -> float:
    client = RawClient(path)
    request = json.dumps({"execute": COMMAND}).encode() + b"\n"
    try:
        start = time.perf_counter()
        for _ in range(n):
            client.sock.sendall(request)
            json.loads(client.readline())
        return n / (time.perf_counter() - start)
    finally:
        client.close()


def raw_pipelined(path: Path, n: int) -> float:
    client = RawClient(path)
    request = json.dumps({"execute": COMMAND}).encode() + b"\n"
    try:
        start = time.perf_counter()
        sent = 0
        for _ in range(min(WINDOW, n)):
            client.sock.sendall(request)
            sent += 1
        for _ in range(n):
            json.loads(client.readline())
            if sent < n:
                client.sock.sendall(request)
                sent += 1
        return n / (time.perf_counter() - start)
    finally:
        client.close()


# -- qemu.qmp (asyncio) ----------------------------------------------------------------


def upstream_sequential(path: Path, n: int) -> float:
    async def main() -> float:
        qmp = UpstreamClient("bench")
        await qmp.connect(str(path))
        try:
            start = time.perf_counter()
            for _ in range(n):
                await qmp.execute(COMMAND)
            return n / (time.perf_counter() - start)
        finally:
            await qmp.disconnect()

    return asyncio.run(main())


def upstream_pipelined(path: Path, n: int) -> float:
    async def main() -> float:
        qmp = UpstreamClient("bench")
        await qmp.connect(str(path))

        async def worker(count: int) -> None:
            for _ in range(count):
                await qmp.execute(COMMAND)

        try:
            start = time.perf_counter()
            await asyncio.gather(*(worker(n // WINDOW) for _ in range(WINDOW)))
            return (n // WINDOW * WINDOW) / (time.perf_counter() - start)
        finally:
            await qmp.disconnect()

    return asyncio.run(main())


# -- kvmkit.qmp (trio) -----------------------------------------------------------------


def kvmkit_sequential(path: Path, n: int, ids: bool = False) -> float:
    async def main() -> float:
        async with open_qmp(path, ids=ids) as qmp:
            start = time.perf_counter()
            for _ in range(n):
                await qmp.execute(COMMAND)
            return n / (time.perf_counter() - start)

    return trio.run(main)


def kvmkit_pipelined(path: Path, n: int, ids: bool = False) -> float:
    async def main() -> float:
        async with open_qmp(path, ids=ids) as qmp:

            async def worker(count: int) -> None:
                for _ in range(count):
                    await qmp.execute(COMMAND)

            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(WINDOW):
                    nursery.start_soon(worker, n // WINDOW)
            return (n // WINDOW * WINDOW) / (time.perf_counter() - start)

    return trio.run(main)


def kvmkit_ids_sequential(path: Path, n: int) -> float:
    return kvmkit_sequential(path, n, ids=True)


def kvmkit_ids_pipelined(path: Path, n: int) -> float:
    return kvmkit_pipelined(path, n, ids=True)


# "kvmkit" sends in-band commands without ids (replies match in issue order, as the QMP
# spec guarantees), like the raw socket; qemu.qmp puts an id on every command, and QEMU
# takes ~30 us longer per command then.  "kvmkit ids=True" shows the client with ids too,
# so the two effects can be told apart.
CASES: dict[str, Callable[[Path, int], float]] = {
    "raw socket sequential": raw_sequential,
    "qemu.qmp sequential": upstream_sequential,
    "kvmkit sequential": kvmkit_sequential,
    "kvmkit ids=True sequential": kvmkit_ids_sequential,
    "raw socket pipelined": raw_pipelined,
    "qemu.qmp pipelined": upstream_pipelined,
    "kvmkit pipelined": kvmkit_pipelined,
    "kvmkit ids=True pipelined": kvmkit_ids_pipelined,
}


def measure(quick: bool = False) -> dict[str, list[float]]:
    n = 400 if quick else 2000
    rounds = 2 if quick else 5
    samples: dict[str, list[float]] = {case: [] for case in CASES}
    with paused_qemu(sockets=len(CASES)) as paths:
        for case, path in zip(CASES, paths, strict=True):
            CASES[case](path, 50)  # warm-up: imports, first connection
        for _ in range(rounds):
            for case, path in zip(CASES, paths, strict=True):
                samples[case].append(CASES[case](path, n))
    return samples


def run(quick: bool = False) -> list[Result]:
    samples = measure(quick)
    rate = {case: statistics.median(values) for case, values in samples.items()}
    results: list[Result] = []
    for mode in ("sequential", "pipelined"):
        raw, upstream, ours, ours_ids = (
            f"raw socket {mode}",
            f"qemu.qmp {mode}",
            f"kvmkit {mode}",
            f"kvmkit ids=True {mode}",
        )
        for case, baseline, target in (
            (ours, raw, ">= 0.9x"),
            (ours, upstream, ">= 1.3x"),
            (upstream, raw, None),
            (ours_ids, upstream, None),
        ):
            short = baseline.split(" ")[0].replace("raw", "raw socket")
            results.append(
                Result(
                    benchmark="qmp",
                    case=f"{case} / {short}",  # unique per row, for --compare
                    value=rate[case],
                    unit="commands/s",
                    baseline_case=baseline,
                    baseline=rate[baseline],
                    higher_is_better=True,
                    target=target,
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
