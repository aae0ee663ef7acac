"""Internal VM snapshots (RAM + device state + disks) with the ``snapshot-save``,
``snapshot-load`` and ``snapshot-delete`` jobs, waited on through ``JOB_STATUS_CHANGE``.

The VM state is stored in a qcow2 disk (``vmstate`` node); every writable disk listed in
``devices`` gets an internal snapshot of the same tag.  Run while the VM runs or is
paused; after ``snapshot-load`` the VM is in the state it was saved in.
"""

from __future__ import annotations

import itertools
from typing import Any

from kvmkit.qemu.errors import SnapshotError
from kvmkit.qmp import ExecuteError, QMPClient, QMPTimeoutError

_jobs = itertools.count(1)


async def _run_job(qmp: QMPClient, command: str, args: dict[str, Any], timeout: float) -> None:
    job_id = f"kvmkit-{command}-{next(_jobs)}"
    async with qmp.listen("JOB_STATUS_CHANGE", match={"id": job_id}) as events:
        try:
            await qmp.execute(command, {"job-id": job_id, **args})
        except ExecuteError as exc:
            raise SnapshotError(f"{command} refused: {exc}") from exc
        try:
            while True:
                event: Any = await events.get(timeout)
                if event["data"]["status"] == "concluded":
                    break
        except QMPTimeoutError:
            raise SnapshotError(
                f"{command} job {job_id} did not conclude within {timeout:g} s"
            ) from None
    jobs = await qmp.execute("query-jobs")
    error = next((j.get("error") for j in jobs if j["id"] == job_id), None)
    await qmp.execute("job-dismiss", {"id": job_id})
    if error:
        raise SnapshotError(f"{command} failed: {error}")


async def save(
    qmp: QMPClient, tag: str, *, vmstate: str, devices: list[str], timeout: float = 120.0
) -> None:
    """Save the VM as snapshot ``tag``: VM state into node ``vmstate``, disks ``devices``."""
    await _run_job(
        qmp, "snapshot-save", {"tag": tag, "vmstate": vmstate, "devices": devices}, timeout
    )


async def load(
    qmp: QMPClient, tag: str, *, vmstate: str, devices: list[str], timeout: float = 120.0
) -> None:
    """Revert the VM (RAM, devices, disks) to snapshot ``tag``."""
    await _run_job(
        qmp, "snapshot-load", {"tag": tag, "vmstate": vmstate, "devices": devices}, timeout
    )


async def delete(qmp: QMPClient, tag: str, *, devices: list[str], timeout: float = 60.0) -> None:
    """Delete snapshot ``tag`` from the disks ``devices``."""
    await _run_job(qmp, "snapshot-delete", {"tag": tag, "devices": devices}, timeout)


async def list_snapshots(qmp: QMPClient, node: str) -> list[dict[str, Any]]:
    """The internal snapshots held by the block node ``node`` (name, vm-state-size...)."""
    for dev in await qmp.execute("query-named-block-nodes", {"flat": True}):
        if dev.get("node-name") == node:
            return list(dev.get("image", {}).get("snapshots", []))
    raise SnapshotError(f"no block node named {node}")
