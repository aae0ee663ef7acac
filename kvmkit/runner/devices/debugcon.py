"""QEMU's ``isa-debugcon``: bytes written to the port go to the console."""

from __future__ import annotations

from kvmkit.runner.context import Console

DEBUGCON_PORT = 0xE9


class DebugConsole:
    """Port 0xe9: each byte written goes to the run's console."""

    name = "debugcon"

    def __init__(self, console: Console) -> None:
        self.console = console

    def io_out(self, port: int, size: int, data: bytes) -> None:
        self.console.write(data[:1])

    def io_in(self, port: int, size: int) -> int:
        return 0xE9  # QEMU's debugcon reads back its port number as a presence check

    def save(self) -> dict[str, int]:
        """No state of its own (kept so a snapshot names every device)."""
        return {}

    def load(self, state: dict[str, int]) -> None:
        if state:
            raise ValueError(f"{self.name} has no state; got {sorted(state)}")
