"""A benchmark whose host lacks what it needs (test-only; loaded through KVMKIT_BENCH_PATH)."""

from benchmarks.common import Skip

TITLE = "needs what this host lacks"


def run(quick: bool = False) -> list[object]:
    raise Skip("this host has no flux capacitor")
