"""The compiled cffi module, re-exported under one name (``from kvmkit._ffi import ffi, lib``)."""

from __future__ import annotations

try:
    from kvmkit._kvm import ffi, lib
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "kvmkit's C extension (kvmkit._kvm) is not built; run `make venv` or "
        "`pip install -e .` (needs gcc and the Linux kernel headers)"
    ) from exc

__all__ = ["ffi", "lib"]
