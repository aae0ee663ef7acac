"""QEMU's ``isa-debug-exit``: writing *v* ends the run.  QEMU's process then exits with
``(v << 1) | 1``; ``kvmkit run`` exits with *v* itself."""

from __future__ import annotations

from kvmkit.runner.context import GuestExit

DEBUG_EXIT_PORT = 0xF4


class DebugExit:
    """Port 0xf4: the value written ends the run with that exit value."""

    name = "debug-exit"

    def io_out(self, port: int, size: int, data: bytes) -> None:
        raise GuestExit(int.from_bytes(data[:size], "little"))

    def io_in(self, port: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def save(self) -> dict[str, int]:
        """No state of its own (kept so a snapshot names every device)."""
        return {}

    def load(self, state: dict[str, int]) -> None:
        if state:
            raise ValueError(f"{self.name} has no state; got {sorted(state)}")
