"""What this host's KVM offers, gathered once for ``kvmkit info`` and the demo."""

from __future__ import annotations

from typing import Any

from kvmkit.kvm.caps import RUNNER_CAPS
from kvmkit.kvm.system import Kvm


def host_info(kvm: Kvm | None = None) -> dict[str, Any]:
    """API version, backend and its meaning, vCPU and slot limits, and the capabilities
    the runner cares about (name → value returned by ``KVM_CHECK_EXTENSION``)."""
    own = kvm is None
    kvm = kvm or Kvm()
    try:
        return {
            "device": kvm.path,
            "api_version": kvm.api_version,
            "backend": kvm.backend,
            "backend_meaning": kvm.backend_meaning,
            "max_vcpus": kvm.max_vcpus,
            "recommended_vcpus": kvm.recommended_vcpus,
            "memory_slots": kvm.max_memory_slots,
            "vcpu_mmap_size": kvm.vcpu_mmap_size,
            "capabilities": {
                cap.name.lower(): {"value": kvm.check_extension(cap), "meaning": meaning}
                for cap, meaning in RUNNER_CAPS.items()
            },
        }
    finally:
        if own:
            kvm.close()


def format_info(info: dict[str, Any]) -> str:
    """``host_info()`` as aligned text for a terminal."""
    lines = [
        f"device          {info['device']}",
        f"api version     {info['api_version']}",
        f"backend         {info['backend']}",
        f"                {info['backend_meaning']}",
        f"vcpus           {info['recommended_vcpus']} recommended, {info['max_vcpus']} max per VM",
        f"memory slots    {info['memory_slots']}",
        "capabilities:",
    ]
    for name, cap in info["capabilities"].items():
        mark = "yes" if cap["value"] else "no "
        lines.append(f"  {mark} {name:<16} {cap['meaning']}")
    return "\n".join(lines)
