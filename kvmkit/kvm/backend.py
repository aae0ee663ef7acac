"""Which hardware (or software) backs /dev/kvm, and what that means for guest code."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

#: What :func:`detect_backend` can answer.
KvmBackend = Literal["vmx", "svm", "pvm", "unknown"]

#: What each backend means for code running inside a guest, in one line.
BACKEND_MEANING: dict[str, str] = {
    "vmx": "Intel VT-x: guest code at every privilege level and in real mode runs natively",
    "svm": "AMD-V: guest code at every privilege level and in real mode runs natively",
    "pvm": (
        "PVM (pagetable-based VM, no VT-x/AMD-V in this CPU): CPL 3 guest code runs natively; "
        "CPL 0 and real-mode code is emulated instruction by instruction by KVM (~µs each), "
        "so kernels boot very slowly and workloads should drop to CPL 3 early"
    ),
    "unknown": "an unrecognised KVM backend: guest code may be native or emulated",
}

_MODULES: dict[str, KvmBackend] = {"kvm_intel": "vmx", "kvm_amd": "svm", "kvm_pvm": "pvm"}


def detect_backend(
    sys_module: Path = Path("/sys/module"), cpuinfo: Path = Path("/proc/cpuinfo")
) -> KvmBackend:
    """Return ``"vmx"``, ``"svm"``, ``"pvm"`` or ``"unknown"``.

    Loaded KVM vendor modules decide (``/sys/module`` also lists built-in ones); when none
    is visible, the CPU flags are the fallback, since a vmx/svm flag with a working
    /dev/kvm almost always means that vendor module.
    """
    found = [backend for module, backend in _MODULES.items() if (sys_module / module).exists()]
    if len(found) == 1:
        return found[0]
    if "pvm" in found:  # PVM can be loaded beside a vendor module; it is then the one in use
        return "pvm"
    try:
        flags = next(
            (
                line.split(":", 1)[1].split()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("flags")
            ),
            [],
        )
    except OSError:
        flags = []
    if "vmx" in flags:
        return "vmx"
    if "svm" in flags:
        return "svm"
    return "unknown"
