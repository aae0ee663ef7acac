"""kvmkit's benchmarks.  Run them all with ``python -m benchmarks`` (or ``make bench``).

Each ``benchmarks/bench_*.py`` module exposes::

    TITLE: str
    def run(quick: bool = False) -> list[Result]

and every :class:`~benchmarks.common.Result` carries the baseline it was measured against
in the same run, so the printed figure is always a ratio, never an absolute promise.
"""
