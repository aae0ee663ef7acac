"""kvmkit.domains: the virsh layer, as libvirt sits on QEMU.

::

    from kvmkit.domains import Definition, Disk, define, guest_kit_boot

    dom = define(Definition("demo", memory_mib=512, boot=guest_kit_boot(),
                            disks=[Disk("/srv/demo.qcow2", "vda")]))
    await dom.start()
    await dom.set_memory(384 << 20, config=True)      # virsh setmem --config
    await dom.shutdown()

Modules: :mod:`.definition` (the persistent definition and its JSON format),
:mod:`.install` (virt-install ``--cdrom``: install from an ISO onto a new disk),
:mod:`.autostart` (the systemd unit that starts autostart domains at boot),
:mod:`.store` (folders, atomic state files, locks), :mod:`.process` (a recorded QEMU,
verified before any signal), :mod:`.domain` (the verbs), :mod:`.disks` (targets and
sources, clones), :mod:`.errors`.
"""

from kvmkit.domains.definition import Boot, Definition, Disk, Nic, guest_kit_boot, validate_name
from kvmkit.domains.domain import Domain, StartReport, define, list_domains, start_autostart
from kvmkit.domains.errors import (
    DefinitionError,
    DomainError,
    InstallError,
    UntrustedStateError,
)
from kvmkit.domains.store import DomainStore, RunState
from kvmkit.statedir import state_root

__all__ = [
    "Domain",
    "define",
    "list_domains",
    "start_autostart",
    "StartReport",
    "Definition",
    "Boot",
    "Disk",
    "Nic",
    "validate_name",
    "guest_kit_boot",
    "DomainStore",
    "RunState",
    "state_root",
    "DomainError",
    "DefinitionError",
    "UntrustedStateError",
    "InstallError",
]
