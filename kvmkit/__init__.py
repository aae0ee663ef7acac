"""kvmkit: KVM hands on, QEMU by protocol.

Layers, lowest first (a lower layer never imports a higher one):

- :mod:`kvmkit.kvm` — typed, safe wrapper over the KVM ioctls (``Kvm``, ``Vm``, ``Vcpu``,
  ``GuestMemory``, typed exits).
- :mod:`kvmkit.runner` — the minimal VM runner: modes, loaders, device bus, run loops.
- :mod:`kvmkit.qmp` — trio QMP client.
- :mod:`kvmkit.qemu` — QEMU machines: launch, console, hotplug, disks, migration.
"""

from kvmkit.errors import KvmkitError

__version__ = "0.1.0"
__all__ = ["KvmkitError", "__version__"]
