"""The device bus: port-I/O and MMIO ranges, each claimed by one device.

Dispatch is a dict lookup per port (a bisect for the few long ranges, as a PCI I/O
window) and a bisect per MMIO address.
Unclaimed accesses are counted; they read as all ones and writes are dropped, unless
the bus is ``strict``, when they raise :class:`BusError` naming the address and RIP.
"""

from __future__ import annotations

import bisect
from typing import Any, Protocol

from kvmkit.runner.errors import BusError

#: A device's saved state: JSON-able plain values (ints, strings, lists, dicts), as
#: ``save()`` returns it and ``load()`` takes it back (snapshots, migration).
DeviceState = dict[str, Any]


class StatefulDevice(Protocol):
    """A device whose registers a snapshot or a migration carries."""

    name: str

    def save(self) -> DeviceState: ...

    def load(self, state: DeviceState) -> None: ...


class PortDevice(Protocol):
    """A device on the port-I/O bus: the runner calls it for each IN/OUT in its range."""

    name: str

    def io_out(self, port: int, size: int, data: bytes) -> None: ...

    def io_in(self, port: int, size: int) -> int: ...


class MmioDevice(Protocol):
    """A device on the MMIO bus: the runner calls it for each access in its range."""

    name: str

    def mmio_write(self, addr: int, data: bytes) -> None: ...

    def mmio_read(self, addr: int, length: int) -> int: ...


#: A port range at least this long is kept as one range (see :meth:`Bus.register_ports`).
WINDOW_PORTS = 256


class Bus:
    """Port and MMIO ranges → devices.  Registration happens before the vCPUs run;
    lookups are then read-only and safe from every vCPU thread."""

    def __init__(self) -> None:
        self.ports: dict[int, PortDevice] = {}
        self._port_devices: list[PortDevice] = []
        self._window_starts: list[int] = []
        self._windows: list[tuple[int, int, PortDevice]] = []
        self._mmio_starts: list[int] = []
        self._mmio: list[tuple[int, int, MmioDevice]] = []

    def register_ports(self, base: int, count: int, device: PortDevice) -> None:
        """Give ports ``base .. base+count-1`` to ``device``.  A range of
        :data:`WINDOW_PORTS` or more (a PCI I/O window) is kept as one range, not port by
        port: look ports up with :meth:`port_device`; :attr:`ports` holds the others."""
        if not (base >= 0 and base + count <= 0x10000 and count > 0):
            raise BusError(f"{device.name}: port range {base:#x}+{count} is outside 0..0xffff")
        end = base + count
        clashes = [p for p in self.ports if base <= p < end]
        clashes += [max(s, base) for s, e, _ in self._windows if base < e and s < end]
        if clashes:
            port = min(clashes)
            owner = self.port_device(port)
            assert owner is not None  # each clash lies in a claimed port or window
            raise BusError(f"{device.name}: port {port:#x} is already claimed by {owner.name}")
        if count >= WINDOW_PORTS:
            i = bisect.bisect_right(self._window_starts, base)
            self._window_starts.insert(i, base)
            self._windows.insert(i, (base, end, device))
        else:
            self.ports.update(dict.fromkeys(range(base, end), device))
        if all(d is not device for d in self._port_devices):
            self._port_devices.append(device)

    def port_device(self, port: int) -> PortDevice | None:
        """The device that claimed ``port``, or None."""
        device = self.ports.get(port)
        if device is None and self._windows:
            i = bisect.bisect_right(self._window_starts, port) - 1
            if i >= 0 and port < self._windows[i][1]:
                return self._windows[i][2]
        return device

    def port_devices(self) -> list[PortDevice]:
        """Every device that claimed ports, once each, in the order they registered."""
        return list(self._port_devices)

    def register_mmio(self, base: int, length: int, device: MmioDevice) -> None:
        if length <= 0:
            raise BusError(f"{device.name}: MMIO range at {base:#x} has length {length}")
        i = bisect.bisect_right(self._mmio_starts, base)
        for start, ln, other in self._mmio[max(i - 1, 0) : i + 1]:
            if base < start + ln and start < base + length:
                raise BusError(
                    f"{device.name}: MMIO {base:#x}+{length:#x} overlaps {other.name} at {start:#x}+{ln:#x}"
                )
        self._mmio_starts.insert(i, base)
        self._mmio.insert(i, (base, length, device))

    def mmio_ranges(self) -> list[tuple[int, int]]:
        """Every claimed MMIO range as ``(start, end)``, end exclusive, in address order
        (the C fast path treats every other address as unclaimed)."""
        return [(start, start + length) for start, length, _ in self._mmio]

    def mmio_device(self, addr: int) -> MmioDevice | None:
        i = bisect.bisect_right(self._mmio_starts, addr) - 1
        if i >= 0:
            start, length, device = self._mmio[i]
            if addr < start + length:
                return device
        return None
