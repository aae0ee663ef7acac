"""Live migration of minimal VMs: pre-copy over a framed stream, on KVM's dirty log.

Design
------
- **Sans-I/O protocol** (:mod:`.protocol`): an :class:`Encoder` that returns bytes and a
  :class:`Decoder` fed bytes that returns events (header with magic and version and a
  JSON hello of the memory layout; PAGES/ZERO runs of 4 KiB pages; ROUND markers; one
  STATE record; END with the XXH3-128 checksum of the whole stream; then a one-line JSON verdict
  from the destination).  Every count is bounded, every run must fall in the declared
  memory, and a stream that stops early (mid-page included) or speaks another version is a
  :class:`ProtocolError`.  Tested without sockets or KVM.
- **Sender** (:mod:`.sender`): QEMU's ``ram.c`` loop in small — round 0 sends all memory
  (zero runs as ZERO records) while the guest runs, then the pages a
  :class:`DirtySource` reports (:class:`BitmapDirtySource` on ``KVM_GET_DIRTY_LOG``,
  :class:`RingDirtySource` on the dirty ring), until the remainder fits the downtime
  target at the cost per page the last dirty round measured (at least one dirty round
  runs), or the round limit; then ``pause()``, the remainder,
  the state, and the destination's verdict.  On failure the caller resumes the guest.
- **Receiver** (:mod:`.receiver`): writes pages straight into guest memory, and only
  after END's checksum matched hands the state to ``apply_state``; any fault is reported
  to the source (which then resumes) and raised, and the VM must be discarded.
- **State** (:mod:`.vmstate`): :class:`MigratedState` — the same
  :class:`~kvmkit.kvm.state.VcpuState`/``VmState`` as snapshots, plus device dicts.
- **Transports** (:mod:`.transport`): ``tcp:HOST:PORT`` and ``unix:PATH``, plain
  blocking sockets, every call under a timeout.

The sender copies pages while the vCPU threads run (the GIL is released in ``KVM_RUN``),
so pages torn by a concurrent write are simply dirty again and re-sent next round.
"""

from kvmkit.runner.migration.errors import MigrationError, ProtocolError, TransportError
from kvmkit.runner.migration.protocol import VERSION, Decoder, Encoder, Layout
from kvmkit.runner.migration.receiver import IncomingStats, add_layout_memory, receive_vm
from kvmkit.runner.migration.sender import (
    BitmapDirtySource,
    DirtySource,
    MigrationStats,
    RingDirtySource,
    send_vm,
)
from kvmkit.runner.migration.transport import accept, connect, listen, parse_address
from kvmkit.runner.migration.vmstate import MigratedState

__all__ = [
    "send_vm",
    "receive_vm",
    "MigratedState",
    "BitmapDirtySource",
    "RingDirtySource",
    "DirtySource",
    "MigrationStats",
    "IncomingStats",
    "add_layout_memory",
    "connect",
    "listen",
    "accept",
    "parse_address",
    "Encoder",
    "Decoder",
    "Layout",
    "VERSION",
    "MigrationError",
    "ProtocolError",
    "TransportError",
]
