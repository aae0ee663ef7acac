"""QEMU's ``fw_cfg`` over I/O ports: a 16-bit selector at 0x510, data bytes at 0x511.

Keys served: signature, id, RAM size, CPU count and maximum CPU count, the same numbers
QEMU uses (``hw/nvram/fw_cfg.c``).  Any other key reads as zeros.
"""

from __future__ import annotations

import struct

FW_CFG_PORT_SEL = 0x510
FW_CFG_PORT_DATA = 0x511
FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NB_CPUS = 0x05
FW_CFG_MAX_CPUS = 0x0F


class FwCfg:
    """fw_cfg over ports 0x510/0x511: a selector and a byte-wise data port."""

    name = "fw_cfg"

    def __init__(self, *, ram_size: int, cpus: int, max_cpus: int | None = None) -> None:
        self.items: dict[int, bytes] = {
            FW_CFG_SIGNATURE: b"QEMU",
            FW_CFG_ID: struct.pack("<I", 1),
            FW_CFG_RAM_SIZE: struct.pack("<Q", ram_size),
            FW_CFG_NB_CPUS: struct.pack("<H", cpus),
            FW_CFG_MAX_CPUS: struct.pack("<H", max_cpus or cpus),
        }
        self.selector = 0
        self.offset = 0

    def io_out(self, port: int, size: int, data: bytes) -> None:
        if port == FW_CFG_PORT_SEL:
            self.selector = int.from_bytes(data[:2].ljust(2, b"\0"), "little")
            self.offset = 0

    def io_in(self, port: int, size: int) -> int:
        if port != FW_CFG_PORT_DATA:
            return self.selector
        item = self.items.get(self.selector, b"")
        value = 0
        for i in range(size):  # byte-wise port; wider reads take consecutive bytes
            byte = item[self.offset] if self.offset < len(item) else 0
            self.offset += 1
            value |= byte << (8 * i)
        return value

    def save(self) -> dict[str, int]:
        """The selector and the read offset (the items follow from the machine)."""
        return {"selector": self.selector, "offset": self.offset}

    def load(self, state: dict[str, int]) -> None:
        self.selector = int(state["selector"]) & 0xFFFF
        self.offset = max(0, min(int(state["offset"]), 1 << 16))
