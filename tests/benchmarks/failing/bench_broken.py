"""A deliberately broken benchmark (test-only; loaded through KVMKIT_BENCH_PATH)."""

TITLE = "deliberately broken"


def run(quick: bool = False) -> list[object]:
    raise RuntimeError("this benchmark is broken on purpose")
