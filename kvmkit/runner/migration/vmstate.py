"""The STATE record's payload: every vCPU's and the VM's KVM state, the devices' ``save()``
dicts and the runner's settings, as one JSON document."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kvmkit.errors import KvmError
from kvmkit.kvm.state import StateError, VcpuState, VmState
from kvmkit.kvm.vcpu import Vcpu
from kvmkit.kvm.vm import Vm
from kvmkit.runner.migration.errors import MigrationError, ProtocolError


@dataclass
class MigratedState:
    """The state that crosses with the last round: every vCPU's and the VM's."""

    vcpus: list[VcpuState]
    vm: VmState
    devices: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "vcpus": [v.to_dict() for v in self.vcpus],
                "vm": self.vm.to_dict(),
                "devices": self.devices,
                "machine": self.machine,
            },
        ).encode()  # not sorted: it is parsed, never compared as text

    @classmethod
    def from_bytes(cls, blob: bytes) -> MigratedState:
        try:
            d = json.loads(blob)
            if not isinstance(d, dict) or not isinstance(d.get("vcpus"), list):
                raise ProtocolError("the migrated state is not a state document")
            devices, machine = d.get("devices", {}), d.get("machine", {})
            if not isinstance(devices, dict) or not isinstance(machine, dict):
                raise ProtocolError("the migrated state's devices/machine are not objects")
            return cls(
                [VcpuState.from_dict(v) for v in d["vcpus"]],
                VmState.from_dict(d.get("vm")),
                devices,
                machine,
            )
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ProtocolError("the migrated state is not valid JSON") from None
        except StateError as exc:
            raise ProtocolError(f"the migrated state is malformed: {exc}") from None

    def apply(self, vm: Vm) -> list[Vcpu]:
        """Restore into ``vm`` (VM state first, then each vCPU, created if missing)."""
        try:
            vm.restore_state(self.vm)
            have = {c.index: c for c in vm.vcpus}
            cpus = []
            for state in self.vcpus:
                cpu = have.get(state.index) or vm.create_vcpu(state.index)
                cpu.restore_state(state)
                cpus.append(cpu)
            return cpus
        except KvmError as exc:
            raise MigrationError(f"cannot restore the migrated state: {exc}") from exc
