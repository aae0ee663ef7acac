"""Run every benchmark in this folder: ``python -m benchmarks [--quick] [--only NAME]
[--json OUT.json] [--compare OLD.json] [--report DIR]``.

Each benchmark measures its own baseline in the same run and reports ratios to it, with a
cross-check of every figure.  A benchmark that raises :class:`~benchmarks.common.Skip`
(this host lacks /dev/kvm, QEMU, a compiler) is skipped with that reason; one that raises
anything else is FAILED with its error, and the command then exits 1.  ``--json`` records
each benchmark's status.  ``KVMKIT_BENCH_PATH`` (directories, ``:``-separated) adds
``bench_*.py`` modules from elsewhere (the tests use it for a deliberately broken one).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import pkgutil
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import benchmarks
from benchmarks.common import Result, Skip
from benchmarks.report import compare, print_results, save
from kvmkit.ui import err_console, print_table


@dataclass
class Outcome:
    """What became of one benchmark: ``ok``, ``skipped`` (with the reason) or ``failed``
    (with the error)."""

    name: str
    status: str
    detail: str = ""
    seconds: float = 0.0


def discover() -> dict[str, str | Path]:
    """bench_NAME -> dotted module name (this folder) or file path (KVMKIT_BENCH_PATH)."""
    found: dict[str, str | Path] = {
        m.name: f"benchmarks.{m.name}"
        for m in pkgutil.iter_modules(benchmarks.__path__)
        if m.name.startswith("bench_")
    }
    for directory in filter(None, os.environ.get("KVMKIT_BENCH_PATH", "").split(os.pathsep)):
        for path in sorted(Path(directory).glob("bench_*.py")):
            found[path.stem] = path
    return dict(sorted(found.items()))


def _load(where: str | Path) -> ModuleType:
    if isinstance(where, str):
        return importlib.import_module(where)
    spec = importlib.util.spec_from_file_location(where.stem, where)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {where}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_one(name: str, where: str | Path, quick: bool) -> tuple[Outcome, list[Result]]:
    """Import and run one benchmark; never raises for the benchmark's own errors."""
    start = time.monotonic()
    try:
        module = _load(where)
        err_console.print(f"running {name}: {module.TITLE} ...")
        got = list(module.run(quick=quick))
    except Skip as exc:
        return Outcome(name, "skipped", str(exc), time.monotonic() - start), []
    except Exception as exc:  # one benchmark failing must not hide the others
        return Outcome(name, "failed", f"{type(exc).__name__}: {exc}", time.monotonic() - start), []
    return Outcome(name, "ok", seconds=time.monotonic() - start), got


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="fewer repetitions and smaller workloads"
    )
    parser.add_argument(
        "--only", action="append", default=[], help="run only bench_NAME (repeatable)"
    )
    parser.add_argument("--json", type=Path, help="save all results as JSON")
    parser.add_argument(
        "--compare", type=Path, metavar="OLD.json", help="compare with an earlier --json file"
    )
    parser.add_argument(
        "--report", type=Path, metavar="DIR", help="write a Markdown report with PNG plots"
    )
    args = parser.parse_args(argv)

    found = discover()
    unknown = [o for o in args.only if o not in found and f"bench_{o}" not in found]
    if unknown:
        parser.error(f"no benchmark named {', '.join(unknown)} (have: {', '.join(found)})")
    from kvmkit.kvm.backend import BACKEND_MEANING, detect_backend

    backend = detect_backend()  # every figure below was measured on this KVM
    print(f"KVM backend: {backend} ({BACKEND_MEANING[backend]})")
    results: list[Result] = []
    outcomes: list[Outcome] = []
    for name, where in found.items():
        if args.only and name.removeprefix("bench_") not in args.only and name not in args.only:
            continue
        outcome, got = run_one(name, where, args.quick)
        outcomes.append(outcome)
        results.extend(got)
        if got:
            print_results(got)
    print_table(
        ["benchmark", "status", "detail", "seconds"],
        [
            [o.name, o.status.upper() if o.status == "failed" else o.status, o.detail, o.seconds]
            for o in outcomes
        ],
        title="benchmarks run",
        numeric=["seconds"],
    )
    status = {o.name: {"status": o.status, "detail": o.detail} for o in outcomes}
    if args.json:
        meta = {
            "host": platform.node(),
            "kvm_backend": backend,
            "time": time.time(),
            "quick": args.quick,
            "status": status,
        }
        save(results, args.json, meta)
        print(f"results saved to {args.json}")
    if args.report:
        from kvmkit.demos.report import write_report

        figures = {"benchmarks": [r.to_json() for r in results], "status": status}
        print(f"report written to {write_report(figures, args.report)}")
    if args.compare:
        print("\n== compared with", args.compare, "==")
        for line in compare(results, args.compare):
            print("  " + line)
    failed = [o for o in outcomes if o.status == "failed"]
    for o in failed:
        err_console.print(f"FAILED {o.name}: {o.detail}", markup=False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
