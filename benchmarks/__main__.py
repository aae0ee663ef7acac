"""Run every benchmark in this folder: ``python -m benchmarks [--quick] [--only NAME]
[--json OUT.json] [--compare OLD.json]``.

Each benchmark measures its own baseline in the same run and reports ratios to it; a
benchmark that cannot run on this host (no /dev/kvm, no QEMU) is skipped with the reason.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import platform
import sys
import time
from pathlib import Path

import benchmarks
from benchmarks.common import Result
from benchmarks.report import compare, print_results, save


def discover() -> list[str]:
    return sorted(
        m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_")
    )


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

    results: list[Result] = []
    skipped: list[str] = []
    for name in discover():
        short = name.removeprefix("bench_")
        if args.only and short not in args.only and name not in args.only:
            continue
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"running {name}: {module.TITLE} ...", file=sys.stderr, flush=True)
        start = time.monotonic()
        try:
            got = module.run(quick=args.quick)
        except Exception as exc:  # one benchmark failing must not hide the others
            skipped.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        print(f"  {name} took {time.monotonic() - start:.1f} s", file=sys.stderr)
        results.extend(got)
        print_results(got)
    print("\n== summary: ratios to the baseline measured in the same run ==")
    for r in results:
        if r.ratio is not None and not r.case.endswith(r.baseline_case or "\0"):
            print(f"  {r.benchmark:<28} {r.case:<48} {r.ratio:6.2f}x {r.target or ''}")
    for line in skipped:
        print(f"  skipped {line}")
    if args.json:
        save(
            results, args.json, {"host": platform.node(), "time": time.time(), "quick": args.quick}
        )
        print(f"results saved to {args.json}")
    if args.report:
        from kvmkit.demos.report import write_report

        figures = {
            "benchmarks": [r.to_json() for r in results],
            "skipped": dict(s.split(": ", 1) for s in skipped),
        }
        print(f"report written to {write_report(figures, args.report)}")
    if args.compare:
        print("\n== compared with", args.compare, "==")
        for line in compare(results, args.compare):
            print("  " + line)
    return 1 if skipped and not results else 0


if __name__ == "__main__":
    sys.exit(main())
