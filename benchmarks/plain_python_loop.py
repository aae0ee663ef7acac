"""The plainest Python ``KVM_RUN`` loop: the baseline for kvmkit's Python loop.

``fcntl.ioctl`` for ``KVM_RUN``, its own ``mmap`` of the vCPU's ``kvm_run`` page, ``struct``
to decode the exit, and a dict of port handlers — nothing else.  It does the same work as
kvmkit's Python loop on the exit guest of :mod:`kvmkit.demos.exits`: the console port's
bytes are kept, a mark reads its label from guest memory and takes the time, the exit port
ends the run, MMIO writes are counted per address.  It is a way for
:func:`kvmkit.demos.exits.measure`, named ``plain Python loop``.
"""

from __future__ import annotations

import fcntl
import mmap
import struct
import time
from typing import Any

KVM_RUN = 0xAE80  # _IO(KVMIO, 0x80)
KVM_EXIT_IO, KVM_EXIT_HLT, KVM_EXIT_MMIO = 2, 5, 6
_REASON = struct.Struct("<I")  # kvm_run.exit_reason, at offset 8
_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset at offset 32
_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data, len, is_write at offset 32
_MARK_ARG = struct.Struct("<QQ")  # label_gpa, label_len
MAX_LABEL = 48


class _Stop(Exception):
    pass


def run_plain(
    vm: Any, vcpu: Any, *, exit_port: int, mark_port: int, console_port: int
) -> list[int]:
    """Run ``vcpu`` until the guest writes ``exit_port``; return the monotonic-clock
    nanoseconds of each mark.  ``vm.read(gpa, n)`` reads guest memory."""
    fd = vcpu.fd
    page = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    marks: list[int] = []
    console = bytearray()
    mmio: dict[int, int] = {}

    def mark(data: bytes) -> None:
        now = time.monotonic_ns()
        label_gpa, length = _MARK_ARG.unpack(vm.read(int.from_bytes(data, "little"), 16))
        vm.read(label_gpa, min(length, MAX_LABEL))
        marks.append(now)

    def stop(data: bytes) -> None:
        raise _Stop

    handlers = {console_port: console.extend, mark_port: mark, exit_port: stop}
    try:
        while True:
            fcntl.ioctl(fd, KVM_RUN, 0)
            (reason,) = _REASON.unpack_from(page, 8)
            if reason == KVM_EXIT_IO:
                _direction, size, port, count, off = _IO.unpack_from(page, 32)
                handler = handlers.get(port)
                if handler is not None:
                    handler(page[off : off + size * count])
            elif reason == KVM_EXIT_MMIO:
                addr = _MMIO.unpack_from(page, 32)[0]
                mmio[addr] = mmio.get(addr, 0) + 1
            elif reason != KVM_EXIT_HLT:
                raise RuntimeError(f"plain Python loop: unexpected exit reason {reason}")
    except _Stop:
        return marks
    finally:
        page.close()
