"""What ``Kvm``, ``Vm`` and ``Vcpu`` share: an owned file descriptor, explicit idempotent
closing, and one place that turns a failed ioctl into a :class:`KvmIoctlError`."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from kvmkit._ffi import ffi, lib
from kvmkit.errors import ClosedError, KvmIoctlError
from kvmkit.kvm import ioctls

_ulong = ffi.typeof("unsigned long")


class FdObject:
    """An object that owns one KVM file descriptor.

    Subclasses set ``self._fd`` and may extend :meth:`_release` for resources tied to
    the fd (mappings, children).  After :meth:`close`, every method that touches the fd
    raises :class:`ClosedError` instead of reaching the kernel with a stale number.
    """

    _fd: int = -1

    def _describe(self) -> str:
        return type(self).__name__

    @property
    def fd(self) -> int:
        self._check_open()
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _check_open(self) -> None:
        if self._fd < 0:
            raise ClosedError(
                f"{self._describe()} is closed", hint="create a new one; closed objects stay closed"
            )

    def _ioctl(self, request: int, arg: Any = 0) -> int:
        """Issue ``request`` on this object's fd; ``arg`` is an int or a cdata pointer.

        Raises :class:`KvmIoctlError` naming the ioctl, errno and this object on failure.
        """
        self._check_open()
        if isinstance(arg, int):
            arg = ffi.cast(_ulong, arg)
        rc = lib.ioctl(self._fd, request, arg)
        if rc < 0:
            raise KvmIoctlError(
                ioctls.NAMES.get(request, hex(request)), ffi.errno, self._describe()
            )
        return int(rc)

    def _release(self) -> None:
        """Free what hangs off the fd.  Called once, before the fd is closed."""

    def close(self) -> None:
        """Release the fd and everything tied to it.  Safe to call more than once."""
        if self._fd < 0:
            return
        try:
            self._release()
        finally:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
