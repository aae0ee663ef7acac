"""Which QEMU accelerator can run a workload on this host.

``kvm`` needs a usable ``/dev/kvm`` whose backend can run the guest: VMX and SVM run
anything; PVM (``kvm_pvm``, paging-based virtualization for nested use) runs CPL-3 code
natively but emulates every ring-0 instruction, so a Linux kernel does not boot on it
and Linux guests need ``tcg``.  The choice is always reported with its reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kvmkit.kvm.backend import detect_backend

Backend = Literal["vmx", "svm", "pvm", "other", "none"]
Workload = Literal["linux", "tiny"]

_SYS_MODULE = Path("/sys/module")


def kvm_backend(sys_module: Path = _SYS_MODULE) -> Backend:
    """The KVM backend behind /dev/kvm: ``vmx`` (kvm_intel), ``svm`` (kvm_amd), ``pvm``
    (kvm_pvm), ``other`` (a /dev/kvm with an unknown backend) or ``none`` (no usable
    /dev/kvm)."""
    if not os.path.exists("/dev/kvm") or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "none"
    found = detect_backend(sys_module)
    return "other" if found == "unknown" else found


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator to use and why; ``forced`` when the caller named it."""

    name: str
    reason: str
    backend: Backend
    forced: bool = False

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def choose_accel(
    requested: str | None = None, *, workload: Workload = "linux", backend: Backend | None = None
) -> AccelChoice:
    """Pick ``kvm`` when the host's KVM can run ``workload``, else ``tcg``.

    ``requested`` (``kvm``, ``tcg``, ``auto`` or None) overrides the choice; the caller
    then gets what it asked for, with the reason saying so.
    """
    backend = kvm_backend() if backend is None else backend
    if requested and requested != "auto":
        why = "requested"
        if requested == "kvm" and backend in ("pvm", "none") and workload == "linux":
            why = f"requested; KVM backend {backend} cannot boot a Linux guest, expect a hang"
        return AccelChoice(requested, why, backend, forced=True)
    if backend in ("vmx", "svm"):
        return AccelChoice("kvm", f"/dev/kvm backed by {backend}", backend)
    if backend == "pvm":
        if workload == "tiny":
            return AccelChoice("kvm", "/dev/kvm backed by PVM runs CPL-3 guests natively", backend)
        return AccelChoice(
            "tcg",
            "/dev/kvm is backed by PVM, which emulates ring-0 code: a Linux kernel "
            "does not boot under it",
            backend,
        )
    if backend == "other":
        return AccelChoice("kvm", "/dev/kvm present, backend unknown", backend)
    return AccelChoice("tcg", "no usable /dev/kvm", backend)
