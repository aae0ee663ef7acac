"""A paravirtual byte channel: a ring in guest RAM, a doorbell that is a ``KVM_IOEVENTFD``,
and a host thread that consumes the ring — the guest sends a batch with one port write and
no exit to the VMM (virtio's shape, reduced to one ring of bytes).

ABI (guest side; ``csrc/guests/pvio.c`` is the reference guest)::

    header at a guest-physical address G (8-byte aligned), little-endian u64 fields
      G+0   magic     "KKPVRING" (0x474e495256504b4b)            guest writes
      G+8   size      data bytes in the ring, 1..MAX_RING_SIZE     guest writes, before set-up
      G+16  produced  bytes ever produced (free-running)           guest writes
      G+24  consumed  bytes ever consumed (free-running)           host writes
      G+32  checksum  CRC-32 (zlib's) of every byte consumed       host writes
      G+40  status    0 ok; 1 the host rejected the ring           host writes
      G+48  reserved (2 x u64)
      G+64  data[size]: byte k of the stream is at data[k % size]

    port PVRING_PORT (outl G)   set up (or reset) the ring at G: an exit, answered here;
                                size is read once, here; consumed, checksum and status
                                are zeroed
    port PVRING_DOORBELL (outl) "produced moved": signals the eventfd in the kernel (no
                                exit); the host thread consumes [consumed, produced)

The guest waits for room by polling ``consumed`` (the host publishes it after it has read
the bytes, and the checksum before it).  Only the host's own copies of ``size`` and
``consumed`` are trusted; ``produced`` is read once per pass and must satisfy
``consumed <= produced <= consumed + size``.  A set-up outside RAM, a bad magic, a size
over :data:`MAX_RING_SIZE` or an unaligned address ends the run at once as a crash naming
the fault; a bad ``produced`` sets ``status`` to 1, stops consuming and removes the
ioeventfd, so the guest's next doorbell is an ordinary exit that ends the run the same
way.  Work per doorbell is bounded by the ring's size.

Where the ioeventfd cannot be registered (``use_ioeventfd=False``, or KVM refuses), the
doorbell is an exit and is answered by consuming the ring right there: the same
protocol, one exit per batch (that is what ``ioeventfd_doorbells`` tells apart).

Use :func:`pvring_port_device` for ``RunConfig.port_devices``; the device is closed when
the boot ends (its thread stops and the ioeventfd is removed).
"""

from __future__ import annotations

import os
import select
import threading
import zlib
from collections.abc import Callable
from typing import Any, NoReturn

from kvmkit.errors import KvmkitError
from kvmkit.kvm import Vm
from kvmkit.runner.context import RunContext
from kvmkit.runner.errors import GuestCrashError

PVRING_PORT = 0x720
PVRING_DOORBELL = 0x724
#: Ports the device claims: set-up (4) and doorbell (4).
PVRING_PORTS = 8
MAGIC = int.from_bytes(b"KKPVRING", "little")
HEADER_SIZE = 64
#: The largest ring a guest may set up (the host reads at most this much per pass).
MAX_RING_SIZE = 1 << 20
_SIZE, _PRODUCED, _CONSUMED, _CHECKSUM, _STATUS = 8, 16, 24, 32, 40
STATUS_OK, STATUS_REJECTED = 0, 1
#: How often the consumer thread looks for a stop request while no doorbell comes.
_POLL_MS = 200


class PvRing:
    """The VMM side of the ring.  ``make`` it with the run's context (the VM must have its
    RAM); call :meth:`close` when the run ends (before the VM is closed)."""

    name = "pvring"

    def __init__(self, ctx: RunContext, *, use_ioeventfd: bool = True) -> None:
        self.vm: Vm = ctx.vm
        self._lock = threading.Lock()
        self.header: int | None = None
        self.size = 0
        self.consumed = 0
        self.checksum = 0
        #: Why the ring was rejected (None while it is fine).
        self.error: str | None = None
        #: Doorbell wake-ups the host thread saw (eventfd counts, coalesced by the kernel),
        #: doorbells that exited to the VMM, and passes over the ring.
        self.ioeventfd_doorbells = 0
        self.exiting_doorbells = 0
        self.passes = 0
        self._efd: int | None = None
        self._stop_r, self._stop_w = os.pipe()
        self._thread: threading.Thread | None = None
        if use_ioeventfd:
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            try:
                self.vm.ioeventfd(efd, PVRING_DOORBELL, 4)
            except KvmkitError:
                os.close(efd)  # the doorbell stays an exit (answered in io_out)
            else:
                self._efd = efd
                self._thread = threading.Thread(
                    target=self._consumer, name="kvmkit-pvring", daemon=True
                )
                self._thread.start()

    @property
    def uses_ioeventfd(self) -> bool:
        return self._efd is not None

    # ---- port I/O (exits) ---------------------------------------------------------------
    def io_out(self, port: int, size: int, data: bytes) -> None:
        value = int.from_bytes(data, "little")
        if port == PVRING_PORT:
            self._setup(value)
        elif port == PVRING_DOORBELL:
            with self._lock:
                self.exiting_doorbells += 1
                if self.error is None:
                    self._consume()
            if self.error is not None:
                raise GuestCrashError(f"pvring: {self.error}")

    def io_in(self, port: int, size: int) -> int:
        return (1 << (8 * size)) - 1  # nothing to read

    def _setup(self, gpa: int) -> None:
        with self._lock:
            self.header, self.error = None, None
            if gpa % 8:
                self._reject(f"ring header at {gpa:#x} is not 8-byte aligned")
            try:
                head = self.vm.read(gpa, HEADER_SIZE)
            except KvmkitError:
                self._reject(f"ring header at {gpa:#x} is outside guest RAM")
            magic = int.from_bytes(head[:8], "little")
            size = int.from_bytes(head[_SIZE : _SIZE + 8], "little")
            if magic != MAGIC:
                self._reject(f"ring header at {gpa:#x} has magic {magic:#x}, not {MAGIC:#x}")
            if not 0 < size <= MAX_RING_SIZE:
                self._reject(f"ring size {size}: give 1 to {MAX_RING_SIZE} bytes")
            try:
                self.vm.region_for(gpa, HEADER_SIZE + size)
            except KvmkitError:
                self._reject(f"ring of {size} bytes at {gpa:#x} runs past guest RAM")
            self.header, self.size, self.consumed, self.checksum = gpa, size, 0, 0
            self._put(_CONSUMED, 0)
            self._put(_CHECKSUM, 0)
            self._put(_STATUS, STATUS_OK)

    def _reject(self, why: str) -> NoReturn:
        self.error = why
        raise GuestCrashError(f"pvring: {why}")

    # ---- the consumer ---------------------------------------------------------------------
    def _put(self, offset: int, value: int) -> None:
        assert self.header is not None
        self.vm.write(self.header + offset, value.to_bytes(8, "little"))

    def _consume(self) -> None:
        """One pass over ``[consumed, produced)``; the caller holds the lock."""
        if self.header is None:
            return
        self.passes += 1
        # one aligned 8-byte copy (the header is 8-byte aligned): not torn by the guest's store
        produced = int.from_bytes(self.vm.read(self.header + _PRODUCED, 8), "little")
        if not self.consumed <= produced <= self.consumed + self.size:
            self.error = (
                f"produced index {produced} outside [{self.consumed}, "
                f"{self.consumed + self.size}] (consumed + ring size {self.size})"
            )
            self._put(_STATUS, STATUS_REJECTED)
            self._drop_ioeventfd()
            return
        data = self.header + HEADER_SIZE
        while self.consumed < produced:
            at = self.consumed % self.size
            n = min(produced - self.consumed, self.size - at)
            self.checksum = zlib.crc32(self.vm.read(data + at, n), self.checksum)
            self.consumed += n
        self._put(_CHECKSUM, self.checksum)
        self._put(_CONSUMED, self.consumed)  # last: the guest reads the checksum after it

    def _consumer(self) -> None:
        assert self._efd is not None
        poller = select.poll()
        poller.register(self._efd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            events = dict(poller.poll(_POLL_MS))
            if self._stop_r in events:
                return
            if self._efd not in events:
                continue
            try:
                self.ioeventfd_doorbells += os.eventfd_read(self._efd)
            except BlockingIOError:
                continue
            with self._lock:
                if self.error is not None or self._efd is None:
                    continue
                try:
                    self._consume()
                except KvmkitError as exc:  # the VM's memory went away under us
                    self.error = f"consumer stopped: {exc}"
                    return

    def _drop_ioeventfd(self) -> None:
        """Unhook the doorbell from the eventfd: the next one exits (and ends the run)."""
        if self._efd is None:
            return
        try:
            self.vm.ioeventfd(self._efd, PVRING_DOORBELL, 4, deassign=True)
        except KvmkitError:
            pass  # the VM is being torn down
        # the fd itself is closed by close(), after the consumer thread has stopped

    # ---- life cycle and state -------------------------------------------------------------
    def close(self) -> None:
        """Stop the consumer thread and remove the ioeventfd; idempotent."""
        if self._stop_w >= 0:
            os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if self._efd is not None:
                if self.error is None:
                    self._drop_ioeventfd()
                os.close(self._efd)
                self._efd = None
        for fd in (self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)
        self._stop_r = self._stop_w = -1

    def stats(self) -> dict[str, Any]:
        """What the host saw: bytes consumed, checksum, doorbells, passes, error."""
        with self._lock:
            return {
                "consumed": self.consumed,
                "checksum": self.checksum,
                "ring_size": self.size,
                "ioeventfd_doorbells": self.ioeventfd_doorbells,
                "exiting_doorbells": self.exiting_doorbells,
                "passes": self.passes,
                "error": self.error,
            }

    def save(self) -> dict[str, Any]:
        with self._lock:
            return {
                "header": self.header,
                "size": self.size,
                "consumed": self.consumed,
                "checksum": self.checksum,
                "error": self.error,
            }

    def load(self, state: dict[str, Any]) -> None:
        header = state.get("header")
        size, consumed = int(state.get("size", 0)), int(state.get("consumed", 0))
        if header is not None and not 0 < size <= MAX_RING_SIZE:
            raise KvmkitError(f"pvring state: ring size {size} out of range")
        with self._lock:
            self.header = None if header is None else int(header)
            self.size, self.consumed = size, consumed
            self.checksum = int(state.get("checksum", 0)) & 0xFFFFFFFF
            self.error = state.get("error")


def pvring_port_device(
    devices: list[PvRing] | None = None, *, use_ioeventfd: bool = True
) -> tuple[int, int, Callable[[RunContext], PvRing]]:
    """``(base, count, make)`` for ``RunConfig.port_devices``; each device made is also
    appended to ``devices`` (one per boot), so the caller can read its :meth:`stats`."""

    def make(ctx: RunContext) -> PvRing:
        device = PvRing(ctx, use_ioeventfd=use_ioeventfd)
        if devices is not None:
            devices.append(device)
        return device

    return PVRING_PORT, PVRING_PORTS, make
