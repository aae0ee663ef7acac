"""PCI bus 0 behind configuration mechanism #1, with QEMU's i440FX host bridge at 00:00.0.

- Port 0xcf8 is CONFIG_ADDRESS (only 32-bit writes change it, as ``hw/pci/pci_host.c``;
  0xcfa/0xcfb are its upper bytes, readable; bit 31
  enables, then bus, device, function, register); ports 0xcfc-0xcff are CONFIG_DATA, read
  and written as bytes, words or dwords at the offset the low port bits add.  Port 0xcf9
  is not this device's: byte accesses there go to the reset control register.
- Functions that nobody registered, other buses, and accesses with the enable bit clear
  read as all ones; writes to them are dropped.
- A device joins with :meth:`PciBus.add_function` and a :class:`PciFunction` that lists
  its BARs (:class:`PciBar`: MMIO or I/O ports, a power-of-two size, and the object whose
  ``mmio_read/mmio_write`` or ``io_in/io_out`` answer inside the BAR, called with the
  offset into the BAR).  A taken slot is a :class:`~kvmkit.runner.errors.BusError`.
- As firmware would (SeaBIOS under QEMU), the bus assigns every BAR an address when the
  function is added — MMIO BARs from :data:`PCI_MMIO_WINDOW`, I/O BARs from
  :data:`PCI_IO_WINDOW` — and turns decoding on in the command register, so a kernel that
  expects assigned BARs finds them.  BAR sizing works as on hardware: write all ones, read
  back the size mask.  A guest may move a BAR anywhere inside its window: the bus owns the
  whole MMIO window and I/O window on the runner's bus and routes each access to the BAR
  that covers it at that moment, so moves need no re-registration.  A BAR placed outside
  the windows keeps its register value but decodes nothing (documented limit).
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Any

from kvmkit.runner.bus import Bus, DeviceState
from kvmkit.runner.errors import BusError

PCI_CONFIG_ADDRESS = 0xCF8
PCI_CONFIG_DATA = 0xCFC
#: Guest-physical MMIO window for BARs (below the IOAPIC at 0xfec00000).
PCI_MMIO_WINDOW = (0xE0000000, 0xFEC00000)
#: Port window for I/O BARs (where SeaBIOS puts them).
PCI_IO_WINDOW = (0xC000, 0x10000)
PCI_SLOTS = 32
PCI_FUNCTIONS = 8
CONFIG_SIZE = 256

PCI_COMMAND = 0x04
PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_BAR0 = 0x10
PCI_INTERRUPT_LINE = 0x3C

I440FX_VENDOR, I440FX_DEVICE = 0x8086, 0x1237
PCI_CLASS_BRIDGE_HOST = 0x0600
REDHAT_QUMRANET_VENDOR = 0x1AF4


@dataclass
class PciBar:
    """One base address register: ``kind`` ``"mmio"`` or ``"io"``, ``size`` a power of
    two (at least 16 for MMIO, 4 for I/O), ``handler`` the device that answers inside."""

    index: int
    kind: str
    size: int
    handler: Any
    address: int = 0

    def __post_init__(self) -> None:
        smallest = 16 if self.kind == "mmio" else 4
        if self.kind not in ("mmio", "io"):
            raise BusError(f"BAR {self.index}: kind {self.kind!r} is neither 'mmio' nor 'io'")
        if not 0 <= self.index < 6:
            raise BusError(f"BAR index {self.index}: a type 0 header has BARs 0 to 5")
        if self.size < smallest or self.size & (self.size - 1) or self.size > 1 << 31:
            raise BusError(
                f"BAR {self.index}: size {self.size:#x} is not a power of two from {smallest} bytes"
            )

    @property
    def type_bits(self) -> int:
        return 0x1 if self.kind == "io" else 0x0  # 32-bit, non-prefetchable memory


class PciFunction:
    """A type 0 configuration header.  Subclass or wrap it for a device's own registers;
    ``config`` is the 256-byte space, ``bars`` the BARs by index."""

    def __init__(
        self,
        name: str,
        *,
        vendor: int,
        device: int,
        class_code: int,
        revision: int = 0,
        prog_if: int = 0,
        subsystem_vendor: int = 0,
        subsystem: int = 0,
        bars: list[PciBar] | tuple[PciBar, ...] = (),
        interrupt_pin: int = 0,
    ) -> None:
        self.name = name
        self.config = bytearray(CONFIG_SIZE)
        struct.pack_into("<HH", self.config, 0, vendor, device)
        self.config[8] = revision
        self.config[9] = prog_if
        struct.pack_into("<H", self.config, 0x0A, class_code)
        self.config[0x0E] = 0x00  # header type 0, single function
        struct.pack_into("<HH", self.config, 0x2C, subsystem_vendor, subsystem)
        self.config[0x3D] = interrupt_pin
        self.bars: dict[int, PciBar] = {}
        for bar in bars:
            if bar.index in self.bars:
                raise BusError(f"{name}: BAR {bar.index} given twice")
            self.bars[bar.index] = bar
            self._store_bar(bar)

    def _store_bar(self, bar: PciBar) -> None:
        struct.pack_into("<I", self.config, PCI_BAR0 + 4 * bar.index, bar.address | bar.type_bits)

    def read_config(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset : offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> bool:
        """Store a write as the hardware would; True when BAR decoding may have changed."""
        changed = False
        for i in range(size):
            reg, byte = offset + i, (value >> (8 * i)) & 0xFF
            if PCI_BAR0 <= reg < PCI_BAR0 + 24:
                index, lane = divmod(reg - PCI_BAR0, 4)
                bar = self.bars.get(index)
                if bar is None:
                    continue  # unimplemented BAR: reads 0
                raw = bytearray(self.config[PCI_BAR0 + 4 * index : PCI_BAR0 + 4 * index + 4])
                raw[lane] = byte
                bar.address = int.from_bytes(raw, "little") & ~(bar.size - 1) & 0xFFFFFFFF
                self._store_bar(bar)
                changed = True
            elif reg in (PCI_COMMAND, PCI_COMMAND + 1):
                self.config[reg] = byte & (0x07 if reg == PCI_COMMAND else 0x05)
                changed = True
            elif reg == PCI_INTERRUPT_LINE or reg >= 0x40:
                self.config[reg] = byte
        return changed

    def decodes(self, bar: PciBar) -> bool:
        bit = PCI_COMMAND_IO if bar.kind == "io" else PCI_COMMAND_MEMORY
        return bool(self.config[PCI_COMMAND] & bit)

    def save(self) -> dict[str, object]:
        return {"config": list(self.config)}

    def load(self, state: DeviceState) -> None:
        config = state["config"]
        if not isinstance(config, list) or len(config) != CONFIG_SIZE:
            raise BusError(f"{self.name}: saved config space must be {CONFIG_SIZE} bytes")
        self.config[:] = bytes(config)
        for bar in self.bars.values():
            raw = struct.unpack_from("<I", self.config, PCI_BAR0 + 4 * bar.index)[0]
            bar.address = raw & ~(bar.size - 1)


def i440fx_host_bridge() -> PciFunction:
    """QEMU's i440FX host bridge: 8086:1237 rev 2, class 0600, subsystem 1af4:1100."""
    return PciFunction(
        "i440fx",
        vendor=I440FX_VENDOR,
        device=I440FX_DEVICE,
        class_code=PCI_CLASS_BRIDGE_HOST,
        revision=0x02,
        subsystem_vendor=REDHAT_QUMRANET_VENDOR,
        subsystem=0x1100,
    )


class _Window:
    """The MMIO or port window: routes an access to the decoding BAR that covers it."""

    def __init__(self, pci: PciBus, kind: str) -> None:
        self.name = f"pci-{kind}-window"
        self._pci = pci
        self._kind = kind

    def _find(self, addr: int) -> tuple[Any, int] | None:
        for start, end, handler in self._pci.decode_map(self._kind):
            if start <= addr < end:
                return handler, addr - start
        return None

    def mmio_read(self, addr: int, length: int) -> int:
        hit = self._find(addr)
        return (1 << (8 * length)) - 1 if hit is None else int(hit[0].mmio_read(hit[1], length))

    def mmio_write(self, addr: int, data: bytes) -> None:
        hit = self._find(addr)
        if hit is not None:
            hit[0].mmio_write(hit[1], data)

    def io_in(self, port: int, size: int) -> int:
        hit = self._find(port)
        return (1 << (8 * size)) - 1 if hit is None else int(hit[0].io_in(hit[1], size))

    def io_out(self, port: int, size: int, data: bytes) -> None:
        hit = self._find(port)
        if hit is not None:
            hit[0].io_out(hit[1], size, data)


class PciBus:
    """Bus 0: configuration mechanism #1 plus the BAR windows.  Call :meth:`attach` once
    to claim ports 0xcf8 and 0xcfc-0xcff and the windows on the runner's bus."""

    name = "pci-host"

    def __init__(self) -> None:
        self.address = 0
        self.functions: dict[tuple[int, int], PciFunction] = {}
        self._lock = threading.Lock()
        self._maps: dict[str, tuple[tuple[int, int, Any], ...]] = {"mmio": (), "io": ()}
        self._next = {"mmio": PCI_MMIO_WINDOW[0], "io": PCI_IO_WINDOW[0]}
        self.add_function(i440fx_host_bridge(), slot=0)

    def attach(self, bus: Bus) -> None:
        bus.register_ports(PCI_CONFIG_ADDRESS, 1, self)
        bus.register_ports(PCI_CONFIG_ADDRESS + 2, 2, self)  # 0xcf9 is the reset register
        bus.register_ports(PCI_CONFIG_DATA, 4, self)
        start, end = PCI_MMIO_WINDOW
        bus.register_mmio(start, end - start, _Window(self, "mmio"))
        start, end = PCI_IO_WINDOW
        bus.register_ports(start, end - start, _Window(self, "io"))

    # ---- devices -----------------------------------------------------------------------
    def add_function(self, function: PciFunction, *, slot: int | None = None, fn: int = 0) -> int:
        """Put ``function`` at ``slot`` (default: the first free one) and assign its BARs;
        returns the slot.  Raises :class:`BusError` for a taken or impossible slot or when
        a window has no room left."""
        with self._lock:
            if slot is None:
                free = [s for s in range(PCI_SLOTS) if (s, 0) not in self.functions]
                if not free:
                    raise BusError(f"{function.name}: all {PCI_SLOTS} PCI slots are taken")
                slot = free[0]
            if not (0 <= slot < PCI_SLOTS and 0 <= fn < PCI_FUNCTIONS):
                raise BusError(f"{function.name}: PCI 00:{slot:02x}.{fn} does not exist on bus 0")
            other = self.functions.get((slot, fn))
            if other is not None:
                raise BusError(
                    f"{function.name}: PCI slot 00:{slot:02x}.{fn} is already taken by {other.name}",
                    hint="leave the slot out to take the first free one",
                )
            for bar in function.bars.values():
                window_end = (PCI_MMIO_WINDOW if bar.kind == "mmio" else PCI_IO_WINDOW)[1]
                addr = (self._next[bar.kind] + bar.size - 1) & ~(bar.size - 1)
                if addr + bar.size > window_end:
                    raise BusError(
                        f"{function.name}: no room for BAR {bar.index} ({bar.size:#x} bytes)"
                    )
                self._next[bar.kind] = addr + bar.size
                function.write_config(PCI_BAR0 + 4 * bar.index, 4, addr)
            if function.bars:
                function.write_config(PCI_COMMAND, 2, PCI_COMMAND_IO | PCI_COMMAND_MEMORY)
            self.functions[slot, fn] = function
            self._rebuild()
            return slot

    def _rebuild(self) -> None:
        """Recompute the decode maps; each is swapped in whole, so vCPU threads see either
        the old map or the new one."""
        maps: dict[str, list[tuple[int, int, Any]]] = {"mmio": [], "io": []}
        for function in self.functions.values():
            for bar in function.bars.values():
                lo, hi = PCI_MMIO_WINDOW if bar.kind == "mmio" else PCI_IO_WINDOW
                if function.decodes(bar) and bar.address and lo <= bar.address < hi:
                    maps[bar.kind].append((bar.address, bar.address + bar.size, bar.handler))
        self._maps = {k: tuple(v) for k, v in maps.items()}

    def decode_map(self, kind: str) -> tuple[tuple[int, int, Any], ...]:
        return self._maps[kind]

    # ---- configuration mechanism #1 ---------------------------------------------------------
    def _target(self) -> tuple[PciFunction | None, int]:
        a = self.address
        if not a & 0x80000000 or (a >> 16) & 0xFF != 0:
            return None, 0
        return self.functions.get(((a >> 11) & 0x1F, (a >> 8) & 0x7)), a & 0xFC

    def io_out(self, port: int, size: int, data: bytes) -> None:
        value = int.from_bytes(data[:size], "little")
        with self._lock:
            if port < PCI_CONFIG_DATA:
                if port == PCI_CONFIG_ADDRESS and size == 4:
                    self.address = value & 0x80FFFFFC
                return  # narrower writes (Linux's type 1 probe writes 0xcfb) change nothing
            function, reg = self._target()
            if function is not None and function.write_config(reg + (port & 3), size, value):
                self._rebuild()

    def io_in(self, port: int, size: int) -> int:
        with self._lock:
            if port < PCI_CONFIG_DATA:
                return (self.address >> (8 * (port - PCI_CONFIG_ADDRESS))) & ((1 << (8 * size)) - 1)
            function, reg = self._target()
            if function is None:
                return (1 << (8 * size)) - 1
            offset = reg + (port & 3)
            return function.read_config(offset, min(size, CONFIG_SIZE - offset))

    def save(self) -> dict[str, object]:
        with self._lock:
            return {
                "address": self.address,
                "functions": {f"{s}.{f}": fn.save() for (s, f), fn in self.functions.items()},
            }

    def load(self, state: DeviceState) -> None:
        with self._lock:
            self.address = int(state["address"]) & 0x80FFFFFC
            saved = state["functions"]
            if not isinstance(saved, dict):
                raise BusError("pci-host state: 'functions' must be a mapping")
            for key, fstate in saved.items():
                slot, fn = (int(x) for x in key.split("."))
                function = self.functions.get((slot, fn))
                if function is None:
                    raise BusError(f"pci-host state: no function at 00:{slot:02x}.{fn} to restore")
                function.load(fstate)
            self._rebuild()
