"""Demo step ``containers``: VMs and containers side by side.

The course's claim: a VM boots a whole OS with its own kernel, so it is slow to start and
heavy; a container is only processes in namespaces and cgroups on the host's kernel, so it
starts fast and weighs little.  For 1, 4 and 8 instances started at once, this step times
each instance from its start to its first line of output and measures its memory, for

- an LXC busybox container (``kvmkit.containers``): start = ``lxc-start``; first output =
  the first text its init writes on its console; memory = its cgroup's usage;
- a kvmkit minimal VM (the ``hello`` guest under ``kvmkit.runner``, one Python process
  each): start = spawning the process; first output = the guest's line; memory = the PSS
  of the process, taken while the VM is held at that first output;
- a QEMU ``microvm`` and a QEMU ``pc`` Linux guest (the guest kit, ``QemuMachine``):
  start = launching QEMU; first output = the first line its init prints (the guest kit's
  ready marker), so that, as for the others, it is the guest's first program speaking
  (the kernel's first console line is kept as a second figure: with ``quiet`` it is a
  warning that differs between machines); memory = the PSS of the QEMU process, which
  under TCG includes QEMU's translated-code cache.

PSS and a cgroup's usage are not the same measure (a cgroup also counts page cache its
processes caused, PSS splits shared pages between sharers); both answer "what does one
more instance cost", which is the comparison made here.

Where Linux guests run under TCG (a PVM host, or no KVM) a boot costs seconds of CPU, so
they run at 1 and 4 instances only (8 would take minutes on two shared cores); with KVM
they run at 1, 4 and 8 like the rest.  Every row says how many instances it started and
how many answered.  A guest that does not answer within the timeout is reported as a
hang, not retried.  microvm under TCG hung in every boot here until the kernel was told
the TSC rate (:data:`MICROVM_NOTE`).

``python -m kvmkit.demos.containers --hello-worker IMAGE`` is the kvmkit-VM worker.
"""

from __future__ import annotations

import io
import os
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvmkit.demos.progress import Say, Task

COUNTS = (1, 4, 8)
LINUX_COUNTS = (1, 4)
LINUX_MEMORY_MIB = 128
LINUX_TIMEOUT_S = 30.0
VM_TIMEOUT_S = 60.0
CONTAINER_TIMEOUT_S = 20.0
KINDS = ("LXC container", "kvmkit VM (hello)", "QEMU microvm Linux", "QEMU pc Linux")

EXPLANATION = (
    "A VM boots an operating system with its own kernel; a container is a group of "
    "processes that the host's kernel keeps apart with namespaces and cgroups. We start "
    "1, 4 and 8 of each side by side and time each from its start to its first line of "
    "output, then weigh it: an LXC busybox container, a kvmkit minimal VM running the "
    "'hello' guest, and a Linux guest under QEMU on the 'microvm' and on the 'pc' machine."
)


@dataclass
class Instance:
    """One started VM or container: its timings, memory and first output (or problem)."""

    index: int
    start_s: float | None = None  # start to first line of output
    kernel_s: float | None = None  # Linux guests: start to the kernel's first console line
    inner_s: float | None = None  # kvmkit VM: run_guest() to first output, in the process
    memory_bytes: int | None = None
    first_line: str = ""
    problem: str = ""  # "hang: ..." or "error: ..."


@dataclass
class Round:
    """``count`` instances of one kind started at once, and the summary row they make."""

    kind: str
    count: int
    accel: str
    memory_measure: str
    instances: list[Instance] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        starts = [i.start_s for i in self.instances if i.start_s is not None]
        mem = [i.memory_bytes for i in self.instances if i.memory_bytes is not None]
        kernel = [i.kernel_s for i in self.instances if i.kernel_s is not None]
        return {
            "kind": self.kind,
            "count": self.count,
            "answered": len(starts),
            "accel": self.accel,
            "median_start_s": statistics.median(starts) if starts else None,
            "max_start_s": max(starts) if starts else None,
            "median_kernel_s": statistics.median(kernel) if kernel else None,
            "mean_memory_bytes": statistics.mean(mem) if mem else None,
            "memory_measure": self.memory_measure,
            "problems": [i.problem for i in self.instances if i.problem],
        }

    def to_json(self) -> dict[str, Any]:
        return {**self.summary(), "instances": [asdict(i) for i in self.instances]}


# -- LXC containers -----------------------------------------------------------------------


def measure_containers(counts: tuple[int, ...] = COUNTS) -> tuple[list[Round], str]:
    """Rounds of busybox containers started at once; returns them and ``uname -r`` from
    inside one.  Every container is destroyed before this returns."""
    from kvmkit.containers import Container

    rounds: list[Round] = []
    uname = ""
    with (
        tempfile.TemporaryDirectory(prefix="kvmkit-ct-demo-") as tmp,
        ThreadPoolExecutor(max_workers=max(counts)) as pool,
    ):
        cts = [Container(f"kkdemo{os.getpid()}-{i}", tmp) for i in range(max(counts))]
        try:
            list(pool.map(lambda ct: ct.create("busybox"), cts))
            for count in counts:
                batch = cts[:count]
                instances = list(pool.map(_start_container, batch, range(count)))
                for ct, inst in zip(batch, instances, strict=True):
                    if inst.start_s is not None:
                        inst.memory_bytes = ct.info().memory_bytes
                if not uname and instances[0].start_s is not None:
                    uname = batch[0].attach(["uname", "-r"], timeout=10)[1].strip()
                list(pool.map(lambda ct: ct.running and ct.stop(kill=True), batch))
                rounds.append(
                    Round("LXC container", count, "none (host kernel)", "cgroup", instances)
                )
        finally:
            list(pool.map(lambda ct: ct.defined and ct.destroy(force=True), cts))
    return rounds, uname


def _start_container(ct: Any, index: int) -> Instance:
    inst = Instance(index)
    start = time.perf_counter()
    try:
        ct.start()
        deadline = start + CONTAINER_TIMEOUT_S
        while not (text := ct.console_log().strip()):
            if time.perf_counter() > deadline:
                inst.problem = f"hang: no console output within {CONTAINER_TIMEOUT_S:g} s"
                return inst
            time.sleep(0.001)
        inst.start_s = time.perf_counter() - start
        inst.first_line = text.splitlines()[0][:120]
    except Exception as exc:
        inst.problem = f"error: {exc}"
    return inst


# -- kvmkit minimal VMs -------------------------------------------------------------------


def measure_kvmkit_vms(counts: tuple[int, ...] = COUNTS) -> list[Round]:
    """Rounds of ``hello`` guests, one ``kvmkit.runner`` process each, started at once.
    Each VM is held at its first output while its PSS is taken, then released."""
    from kvmkit.guests import build_guest

    image = build_guest("hello")
    return [_kvmkit_round(image, count) for count in counts]


def _kvmkit_round(image: Path, count: int) -> Round:
    import psutil

    argv = [sys.executable, "-m", "kvmkit.demos.containers", "--hello-worker", str(image)]
    rnd = Round("kvmkit VM (hello)", count, "kvm", "PSS")
    procs: list[tuple[subprocess.Popen[bytes], float, Instance]] = []
    try:
        for i in range(count):
            start = time.perf_counter()
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            procs.append((proc, start, Instance(i)))
        deadline = time.perf_counter() + VM_TIMEOUT_S
        with selectors.DefaultSelector() as sel:
            for proc, start, inst in procs:
                assert proc.stdout is not None
                sel.register(proc.stdout, selectors.EVENT_READ, (proc, start, inst))
            waiting = len(procs)
            while waiting and time.perf_counter() < deadline:
                for key, _ in sel.select(max(0.0, deadline - time.perf_counter())):
                    proc, start, inst = key.data
                    line = proc.stdout.readline()
                    now = time.perf_counter()
                    sel.unregister(key.fileobj)
                    waiting -= 1
                    if not line:
                        inst.problem = f"error: the VM process exited with {proc.wait()}"
                        continue
                    inst.start_s = now - start
                    text, _, inner = line.decode(errors="replace").rstrip("\n").rpartition("\t")
                    inst.first_line, inst.inner_s = text, float(inner)
                    inst.memory_bytes = psutil.Process(proc.pid).memory_full_info().pss
        for _proc, _, inst in procs:
            if inst.start_s is None and not inst.problem:
                inst.problem = f"hang: no output within {VM_TIMEOUT_S:g} s"
            rnd.instances.append(inst)
    finally:
        for proc, _, _ in procs:
            try:
                if proc.stdin is not None:
                    proc.stdin.close()  # releases a worker held at its first output
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    return rnd


def hello_worker(image: str) -> int:
    """Run ``image`` under ``kvmkit.runner``; at the guest's first line, print it and the
    seconds since ``run_guest`` began (tab-separated), then hold the VM there until stdin
    closes, so the parent can weigh the live VM."""
    from kvmkit.runner.machine import RunConfig, run_guest

    start = time.perf_counter()

    class FirstLine(io.StringIO):
        """The console echo: prints the guest's first line with its time, then holds."""

        def __init__(self) -> None:
            super().__init__()
            self.text = ""
            self.done = False

        def write(self, data: str) -> int:
            if self.done:
                return len(data)
            self.text += data
            if "\n" in self.text:
                self.done = True
                line = self.text.split("\n", 1)[0]
                sys.stdout.write(f"{line}\t{time.perf_counter() - start:.6f}\n")
                sys.stdout.flush()
                sys.stdin.read()  # hold the VM at this exit until the parent lets go
            return len(data)

    result = run_guest(RunConfig(image=Path(image), echo=FirstLine(), timeout=VM_TIMEOUT_S))
    return result.process_status


# -- QEMU Linux guests --------------------------------------------------------------------


async def measure_qemu(
    machine: str, counts: tuple[int, ...] = LINUX_COUNTS
) -> tuple[list[Round], str]:
    """Rounds of guest-kit Linux guests on QEMU machine ``machine``, launched at once;
    returns them and ``uname -r`` from inside the first guest that answered."""
    from kvmkit.qemu import guestkit

    kit = guestkit.ensure_kit()
    rounds = []
    uname = ""
    with tempfile.TemporaryDirectory(prefix="kvmkit-ct-demo-") as tmp:
        for count in counts:
            rnd, got = await _qemu_round(kit, machine, count, Path(tmp), want_uname=not uname)
            rounds.append(rnd)
            uname = uname or got
    return rounds, uname


async def _qemu_round(
    kit: Any, machine: str, count: int, base: Path, *, want_uname: bool
) -> tuple[Round, str]:
    import psutil
    import trio

    from kvmkit.qemu.accel import choose_accel
    from kvmkit.qemu.config import guest_kit_config
    from kvmkit.qemu.guestkit import READY_MARKER
    from kvmkit.qemu.machine import QemuMachine

    machines: dict[int, QemuMachine] = {}
    instances = [Instance(i) for i in range(count)]
    uname = ""
    append = kit.append
    khz = _host_tsc_khz()
    if machine == "microvm" and choose_accel(None).name == "tcg" and khz:
        append += f" tsc_early_khz={khz}"  # see microvm_note()

    async def boot(i: int, nursery: trio.Nursery) -> None:
        inst = instances[i]
        config = guest_kit_config(
            kit,
            machine=machine,
            memory_mib=LINUX_MEMORY_MIB,
            name=f"demo-{machine}-{i}",
            append=append,
        )
        m = QemuMachine(config, base_dir=base, launch_timeout=LINUX_TIMEOUT_S)
        machines[i] = m
        start = time.perf_counter()
        try:
            await m.launch(nursery)
            with trio.fail_after(max(1.0, LINUX_TIMEOUT_S - (time.perf_counter() - start))):
                # Watch the transcript: expect() would consume what wait_ready() needs.
                while READY_MARKER not in (text := m.console.transcript):
                    if inst.kernel_s is None and any(x.strip() for x in text.split("\n")[:-1]):
                        inst.kernel_s = time.perf_counter() - start
                    await trio.sleep(0.01)
                inst.start_s = time.perf_counter() - start
                inst.first_line = next(x for x in text.splitlines() if READY_MARKER in x)
                if inst.kernel_s is None:
                    inst.kernel_s = inst.start_s
                await m.wait_ready(timeout=LINUX_TIMEOUT_S)
        except trio.TooSlowError:
            inst.problem = f"hang: not ready within {LINUX_TIMEOUT_S:g} s ({m.console.tail(1)!r})"
            return
        except Exception as exc:
            inst.problem = f"error: {type(exc).__name__}: {exc}"
            return
        if m.pid is not None:
            inst.memory_bytes = psutil.Process(m.pid).memory_full_info().pss

    accel = "tcg"
    async with trio.open_nursery() as machines_nursery:
        try:
            async with trio.open_nursery() as boots:
                for i in range(count):
                    boots.start_soon(boot, i, machines_nursery)
            if machines:
                accel = next(iter(machines.values())).accel.name
            ready = [machines[inst.index] for inst in instances if inst.start_s is not None]
            if want_uname and ready:
                uname = (await ready[0].console.run("uname -r", timeout=20)).strip()
        finally:
            with trio.CancelScope(shield=True):
                for m in machines.values():
                    await m.kill()  # demo guests: no need for a graceful shutdown
    kind = f"QEMU {machine} Linux"
    return Round(kind, count, accel, "PSS", instances), uname


def _host_tsc_khz() -> int | None:
    """The host's TSC frequency in kHz as /proc/cpuinfo states it (``cpu MHz``), if it does."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return round(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


MICROVM_NOTE = (
    "microvm under TCG: with no HPET and no ACPI PM timer, the kernel calibrates its TSC "
    "against the PIT, which fails under TCG on a busy host; it then marks the TSC unstable "
    "and hangs with no timer (5 of 5 boots here). TCG's guest TSC runs at the host's rate, "
    "so the step passes tsc_early_khz=<host TSC kHz>, after which microvm boots."
)


# -- the step -----------------------------------------------------------------------------


def containers_step(
    say: Say, task: Task, *, report: Path | None = None, quick: bool = False
) -> dict[str, Any]:
    """Run the whole step; print as it goes; return the figures (and write the plots into
    ``report`` when given).  A part this host cannot run is skipped with the reason."""
    from kvmkit.qemu.accel import choose_accel, kvm_backend

    step_start = time.perf_counter()
    backend = kvm_backend()
    figures: dict[str, Any] = {
        "backend": backend,
        "rounds": [],
        "skipped": {},
        "uname": {},
        "notes": [],
    }
    linux_accel = choose_accel(None).name
    counts = (1, 4) if quick else COUNTS
    linux_counts = counts if linux_accel == "kvm" else (1,) if quick else LINUX_COUNTS
    figures["counts"] = {"containers_and_kvmkit_vms": list(counts), "linux": list(linux_counts)}
    say(f"  KVM backend: {backend}; Linux guests run under {linux_accel}.")
    if linux_counts != counts:
        say(
            f"  Linux guests run at {', '.join(map(str, linux_counts))} instance(s) at once "
            f"only: under TCG each boot costs seconds of CPU, and this host has "
            f"{os.cpu_count()} CPU(s)."
        )

    reason = _no_lxc()
    if reason:
        figures["skipped"]["LXC container"] = reason
        say(f"  LXC containers skipped: {reason}")
    else:
        with task(f"starting busybox containers ({', '.join(map(str, counts))} at once)"):
            rounds, uname = measure_containers(counts)
        figures["rounds"] += [r.to_json() for r in rounds]
        figures["uname"]["LXC container"] = uname

    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        figures["skipped"]["kvmkit VM (hello)"] = "no usable /dev/kvm"
        say("  kvmkit VMs skipped: no usable /dev/kvm")
    else:
        with task(f"starting kvmkit hello VMs ({', '.join(map(str, counts))} at once)"):
            figures["rounds"] += [r.to_json() for r in measure_kvmkit_vms(counts)]
        figures["uname"]["kvmkit VM (hello)"] = "(no kernel: the guest program is the whole OS)"

    import shutil

    if shutil.which("qemu-system-x86_64") is None:
        for machine in ("microvm", "pc"):
            figures["skipped"][f"QEMU {machine} Linux"] = "qemu-system-x86_64 is not installed"
        say("  QEMU guests skipped: qemu-system-x86_64 is not installed")
    else:
        import trio

        for machine in ("microvm", "pc"):
            with task(
                f"booting QEMU {machine} Linux guests ({', '.join(map(str, linux_counts))} at once)"
            ):
                rounds, uname = trio.run(measure_qemu, machine, linux_counts)
            figures["rounds"] += [r.to_json() for r in rounds]
            figures["uname"][f"QEMU {machine} Linux"] = uname
            if machine == "microvm" and rounds and rounds[0].accel == "tcg":
                figures["notes"].append(MICROVM_NOTE)

    figures["step_s"] = time.perf_counter() - step_start
    say(format_rounds(figures))
    for note in figures["notes"]:
        say(f"  Note: {note}")
    say(f"  host kernel: {os.uname().release}")
    for kind, uname in figures["uname"].items():
        say(f"  uname -r inside {kind}: {uname or '(no answer)'}")
    say(
        "  Read it: the container shares the host's kernel (same uname -r) and its start is "
        "a few process creations; each Linux VM boots its own kernel first. The kvmkit VM has "
        "no OS at all, and most of its start is a Python process starting."
    )
    if backend == "pvm":
        say(
            "  On this PVM host the Linux guests run under TCG (QEMU translates every "
            "instruction), so their start times are far longer than with VT-x/AMD-V, where "
            "they would use KVM. The hello guest's few instructions run at CPL 0, which PVM "
            "emulates, too few to show; the container does not use KVM at all."
        )
    if report is not None:
        figures["plots"] = write_plots(figures, report)
        say(f"  plots: {', '.join(figures['plots'])}")
    say(f"  this step took {figures['step_s']:.0f} s, most of it booting Linux under TCG")
    return figures


def _no_lxc() -> str | None:
    from kvmkit.containers import LxcUnavailableError, check_lxc

    try:
        check_lxc()
    except LxcUnavailableError as exc:
        return str(exc)
    return None


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f} MiB"


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:,.0f} ms" if value < 1 else f"{value:,.2f} s"


def format_rounds(figures: dict[str, Any]) -> str:
    """The step's table as text (rich, plain when not a terminal)."""
    import io

    from rich.console import Console

    from kvmkit.ui import make_table

    rows = []
    for r in figures["rounds"]:
        rows.append(
            [
                r["kind"],
                f"{r['answered']}/{r['count']}",
                r["accel"],
                _secs(r["median_start_s"]),
                _secs(r["max_start_s"]),
                _secs(r["median_kernel_s"]),
                f"{_mib(r['mean_memory_bytes'])} ({r['memory_measure']})",
                "; ".join(r["problems"]) or "",
            ]
        )
    for kind, why in figures["skipped"].items():
        rows.append([kind, "-", "-", "-", "-", "-", "-", f"skipped: {why}"])
    columns = [
        "instance",
        "answered",
        "accel",
        "start→output (median)",
        "slowest",
        "kernel's 1st line",
        "memory each",
        "notes",
    ]
    buffer = io.StringIO()
    console = Console(file=buffer, width=220, highlight=False)
    console.print(make_table(columns, rows, numeric=columns[1:7]))
    return "\n".join("  " + line for line in buffer.getvalue().rstrip().splitlines())


def write_plots(figures: dict[str, Any], directory: Path) -> list[str]:
    """``containers_start.png`` and ``containers_memory.png`` (both log scale: the
    instances differ by orders of magnitude) in ``directory``; returns their names."""
    from kvmkit.demos.report import _pyplot

    plt = _pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    rounds = figures["rounds"]
    kinds = [k for k in KINDS if any(r["kind"] == k for r in rounds)]
    accels = {r["kind"]: r["accel"] for r in rounds}
    counts = sorted({r["count"] for r in rounds})
    width = 0.8 / max(1, len(counts))
    plots = (
        ("median_start_s", 1, "start to first output, s (median; log scale)", "start"),
        ("mean_memory_bytes", 2**20, "memory per instance, MiB (log scale)", "memory"),
    )
    names = []
    for key, unit, label, slug in plots:
        fig, ax = plt.subplots(figsize=(8, 4))
        for j, count in enumerate(counts):
            xs, ys = [], []
            for x, kind in enumerate(kinds):
                offset = x + (j - (len(counts) - 1) / 2) * width
                r = next((r for r in rounds if r["kind"] == kind and r["count"] == count), None)
                if r is None or r[key] is None:
                    why = "not run" if r is None else "no answer"
                    ax.annotate(
                        why,
                        (offset, 0),
                        xycoords=("data", "axes fraction"),
                        xytext=(0, 3),
                        textcoords="offset points",
                        ha="center",
                        rotation=90,
                        fontsize=6,
                        color="grey",
                    )
                    continue
                xs.append(offset)
                ys.append(r[key] / unit)
            bars = ax.bar(xs, ys, width=width, label=f"{count} at once")
            ax.bar_label(bars, labels=[f"{y:.3g}" for y in ys], fontsize=6)
        ax.set_xticks(range(len(kinds)))
        ax.set_xticklabels([f"{k}\n(accel: {accels[k]})" for k in kinds], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel(label, fontsize=8)
        ax.set_title(
            f"VMs and containers: {label.split(',')[0]}; KVM backend: {figures['backend']}",
            fontsize=9,
        )
        ax.legend(fontsize=7)
        fig.text(0.01, 0.01, _plot_footnote(figures), fontsize=6, color="grey")
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        name = f"containers_{slug}.png"
        fig.savefig(directory / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def _plot_footnote(figures: dict[str, Any]) -> str:
    text = "Containers: cgroup memory usage; VMs: PSS of the VMM process."
    linux = figures["counts"]["linux"]
    if linux != figures["counts"]["containers_and_kvmkit_vms"]:
        text += (
            f" Linux guests at {', '.join(map(str, linux))} at once only "
            "(under TCG a boot costs seconds of CPU)."
        )
    return text


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--hello-worker":
        return hello_worker(argv[1])
    print("usage: python -m kvmkit.demos.containers --hello-worker IMAGE", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
