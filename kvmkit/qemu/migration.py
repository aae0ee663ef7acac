"""Live migration over QMP, as libvirt's QEMU driver drives it.

The destination is a QEMU started with ``-incoming defer``; :func:`prepare_incoming` sets
its capabilities and runs ``migrate-incoming``.  :func:`migrate` sets the source's
capabilities and parameters (checked by reading them back), sends ``migrate``, follows
``MIGRATION``/``MIGRATION_PASS`` events and ``query-migrate`` for progress, and returns
:class:`MigrationStats` when the migration completes.

- Cancelling the calling trio scope (or Ctrl-C) runs ``migrate_cancel``, waits for the
  migration to end and leaves the source running.
- A destination that dies makes the source's migration fail: the source keeps running and
  :class:`MigrationError` says so.
- Save/restore to a file is a migration to ``exec:cat > FILE`` (QEMU 7.2 has no
  ``file:`` URIs) and back from ``exec:cat FILE``.
- Auto-converge under TCG corrupted guests in every run measured here: asking for it
  issues a :class:`MigrationWarning`.
"""

from __future__ import annotations

import shlex
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from kvmkit.qemu.errors import MigrationError
from kvmkit.qemu.machine import QemuMachine
from kvmkit.qmp import ExecuteError, QMPClient, QMPError

MIB = 2**20


class MigrationWarning(UserWarning):
    """A migration option known to be unsafe on this host was requested."""


@dataclass
class MigrationOptions:
    """Capabilities and parameters for one migration.

    ``max_bandwidth`` is bytes per second (None: QEMU's default, 32 MiB/s in 7.2, which
    kvmkit raises to ``DEFAULT_BANDWIDTH`` for local migrations); ``downtime_limit_ms``
    is the longest pause allowed at switch-over.  ``postcopy`` and ``multifd_channels``
    need the same capability on the destination: pass the same options to
    :func:`prepare_incoming`.
    """

    downtime_limit_ms: int | None = None
    max_bandwidth: int | None = None
    postcopy: bool = False
    auto_converge: bool = False
    multifd_channels: int | None = None

    def capabilities(self) -> dict[str, bool]:
        caps = {"events": True, "postcopy-ram": self.postcopy, "auto-converge": self.auto_converge}
        caps["multifd"] = self.multifd_channels is not None
        return caps

    def incoming_capabilities(self) -> dict[str, bool]:
        caps = self.capabilities()
        del caps["auto-converge"]
        return caps

    def parameters(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.downtime_limit_ms is not None:
            params["downtime-limit"] = self.downtime_limit_ms
        if self.max_bandwidth is not None:
            params["max-bandwidth"] = self.max_bandwidth
        if self.multifd_channels is not None:
            params["multifd-channels"] = self.multifd_channels
        return params


DEFAULT_BANDWIDTH = 1 << 40  # effectively unlimited: local migrations should not be capped


@dataclass
class MigrationStats:
    """The result of a migration, from ``query-migrate`` (times in ms, sizes in bytes)."""

    status: str
    total_time_ms: int = 0
    downtime_ms: int = 0
    setup_time_ms: int = 0
    transferred_bytes: int = 0
    ram_total_bytes: int = 0
    normal_pages: int = 0
    zero_pages: int = 0
    page_size: int = 4096
    dirty_sync_count: int = 0
    passes: int = 0
    mbps: float = 0.0
    postcopy_requests: int = 0
    wall_time_s: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_query(cls, info: dict[str, Any], **extra: Any) -> MigrationStats:
        ram = info.get("ram", {})
        return cls(
            status=str(info.get("status", "none")),
            total_time_ms=int(info.get("total-time", 0)),
            downtime_ms=int(info.get("downtime", 0)),
            setup_time_ms=int(info.get("setup-time", 0)),
            transferred_bytes=int(ram.get("transferred", 0)),
            ram_total_bytes=int(ram.get("total", 0)),
            normal_pages=int(ram.get("normal", 0)),
            zero_pages=int(ram.get("duplicate", 0)),
            page_size=int(ram.get("page-size", 4096)),
            dirty_sync_count=int(ram.get("dirty-sync-count", 0)),
            mbps=float(ram.get("mbps", 0.0)),
            postcopy_requests=int(ram.get("postcopy-requests", 0)),
            **extra,
        )

    @property
    def throughput_mib_s(self) -> float:
        """Bytes sent per second of total migration time, in MiB/s."""
        if self.total_time_ms <= 0:
            return 0.0
        return self.transferred_bytes / MIB / (self.total_time_ms / 1000)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["throughput_mib_s"] = round(self.throughput_mib_s, 1)
        return data

    def summary(self) -> str:
        return (
            f"{self.status}: total {self.total_time_ms} ms, downtime {self.downtime_ms} ms, "
            f"setup {self.setup_time_ms} ms, {self.transferred_bytes / MIB:.1f} MiB sent "
            f"({self.normal_pages} pages, {self.zero_pages} zero pages), "
            f"{self.throughput_mib_s:.0f} MiB/s, {self.dirty_sync_count} dirty syncs"
        )


#: progress(info): called with each ``query-migrate`` reply while migrating.
Progress = Callable[[dict[str, Any]], None]


async def _set_capabilities(qmp: QMPClient, caps: dict[str, bool], side: str) -> None:
    wanted = [{"capability": k, "state": v} for k, v in caps.items()]
    try:
        await qmp.execute("migrate-set-capabilities", {"capabilities": wanted})
    except ExecuteError as exc:
        raise MigrationError(f"{side}: cannot set migration capabilities {caps}: {exc}") from exc
    have = {c["capability"]: c["state"] for c in await qmp.execute("query-migrate-capabilities")}
    wrong = {k: have.get(k) for k, v in caps.items() if have.get(k) != v}
    if wrong:
        raise MigrationError(f"{side}: capabilities did not take effect: {wrong}")


async def _set_parameters(qmp: QMPClient, params: dict[str, Any], side: str) -> None:
    if not params:
        return
    try:
        await qmp.execute("migrate-set-parameters", params)
    except ExecuteError as exc:
        raise MigrationError(f"{side}: cannot set migration parameters {params}: {exc}") from exc
    have = await qmp.execute("query-migrate-parameters")
    wrong = {k: have.get(k) for k, v in params.items() if have.get(k) != v}
    if wrong:
        raise MigrationError(f"{side}: parameters did not take effect: {wrong}")


async def _accel_is_tcg(qmp: QMPClient) -> bool:
    return not (await qmp.execute("query-kvm")).get("enabled", False)


#: Under TCG, every corrupted guest seen here had been migrated with this many dirty-bitmap
#: syncs or more (setup + >= 2 iterations + completion); not every such migration corrupts.
RISKY_DIRTY_SYNCS = 4

#: QEMU's default downtime-limit (ms); below it, TCG migrations were seen to corrupt guests.
DEFAULT_DOWNTIME_LIMIT_MS = 300


async def tcg_hazards(source: QMPClient, options: MigrationOptions) -> list[str]:
    """Warnings for options that corrupted migrated guests under TCG on QEMU 7.2 here.

    Both make a dirtying guest's migration take more iterations: auto-converge (4 of 4
    runs corrupt, QEMU-NOTES.md) and a downtime limit below the default (a guest dirtying
    memory panicked on the destination in 12 of 16 runs with 100 ms, 0 of 8 with 300 ms).
    """
    if not await _accel_is_tcg(source):
        return []
    found = []
    if options.auto_converge:
        found.append(
            "auto-converge under TCG corrupted the destination guest in every run measured "
            "on QEMU 7.2; verify the guest after migrating"
        )
    limit = options.downtime_limit_ms
    if limit is not None and limit < DEFAULT_DOWNTIME_LIMIT_MS:
        found.append(
            f"a downtime limit of {limit} ms (< {DEFAULT_DOWNTIME_LIMIT_MS} ms) under TCG made "
            "migrations of a memory-dirtying guest corrupt it (12 of 16 runs with 100 ms on "
            "QEMU 7.2); verify the guest after migrating"
        )
    return found


async def prepare_incoming(
    dest: QMPClient, uri: str, options: MigrationOptions | None = None
) -> str:
    """Make the ``-incoming defer`` QEMU behind ``dest`` listen on ``uri``; returns the
    URI it listens on (a ``tcp:HOST:0`` URI comes back with the port QEMU chose)."""
    options = options or MigrationOptions()
    status = (await dest.execute("query-status"))["status"]
    if status != "inmigrate":
        raise MigrationError(
            f"the destination is {status}, not waiting for a migration",
            hint="start it with incoming='defer'",
        )
    await _set_capabilities(dest, options.incoming_capabilities(), "destination")
    if options.multifd_channels is not None:
        await _set_parameters(dest, {"multifd-channels": options.multifd_channels}, "destination")
    try:
        await dest.execute("migrate-incoming", {"uri": uri})
    except ExecuteError as exc:
        raise MigrationError(f"destination cannot listen on {uri}: {exc}") from exc
    if uri.startswith("tcp:") and uri.endswith(":0"):
        info = await dest.execute("query-migrate")
        for addr in info.get("socket-address", []):
            if addr.get("type") in ("inet", "ipv4", "ipv6"):
                return f"tcp:{addr['host']}:{addr['port']}"
    return uri


async def _status(qmp: QMPClient) -> str:
    return str((await qmp.execute("query-status"))["status"])


async def _cancel_and_restore(source: QMPClient, was_running: bool) -> None:
    """migrate_cancel, wait until the migration has ended, and make sure the source runs
    again if it ran before.  Best effort: never raises."""
    try:
        await source.execute("migrate_cancel", timeout=5)
        # Polling, not an event: query-migrate is the one place QEMU reports that a
        # cancelled migration has ended; the loop is bounded by move_on_after.
        with trio.move_on_after(15):
            while (await source.execute("query-migrate")).get("status") in (  # noqa: ASYNC110
                "active",
                "setup",
                "cancelling",
                "pre-switchover",
                "device",
                "postcopy-active",
                "postcopy-paused",
            ):
                await trio.sleep(0.05)
        if was_running and await _status(source) != "running":
            await source.execute("cont")
    except (QMPError, ExecuteError):
        pass


async def _final_info(source: QMPClient) -> dict[str, Any]:
    # query-migrate may say "completed" with total-time/downtime still 0: ask again.
    info: dict[str, Any] = await source.execute("query-migrate")
    for _ in range(20):
        if info.get("total-time") and "downtime" in info:
            break
        await trio.sleep(0.05)
        info = await source.execute("query-migrate")
    return info


async def migrate(
    source: QMPClient,
    uri: str,
    *,
    options: MigrationOptions | None = None,
    dest: QMPClient | None = None,
    resume_dest: bool = True,
    progress: Progress | None = None,
    timeout: float = 600.0,
    poll_interval: float = 0.25,
) -> MigrationStats:
    """Migrate the VM behind ``source`` to ``uri`` and return the statistics.

    ``dest`` (optional) is the destination's QMP: after completion kvmkit waits for it
    to leave ``inmigrate`` and, if the source was running and ``resume_dest``, resumes
    it (kvmkit starts QEMUs with ``-S``, so they do not autostart).  Raises
    MigrationError when the migration fails (the source then keeps running), and
    re-raises trio's Cancelled after cancelling the migration.
    """
    options = options or MigrationOptions()
    warn = await tcg_hazards(source, options)
    for text in warn:
        warnings.warn(text, MigrationWarning, stacklevel=2)
    await _set_capabilities(source, options.capabilities(), "source")
    params = options.parameters()
    params.setdefault("max-bandwidth", DEFAULT_BANDWIDTH)
    await _set_parameters(source, params, "source")

    was_running = await _status(source) == "running"
    started = time.perf_counter()
    passes = 0
    info: dict[str, Any] = {}
    postcopy_started = False
    try:
        async with source.listen("MIGRATION", "MIGRATION_PASS") as events:
            try:
                await source.execute("migrate", {"uri": uri})
            except ExecuteError as exc:
                raise MigrationError(f"migrate to {uri} refused: {exc}") from exc
            deadline = trio.current_time() + timeout
            status = "setup"
            while True:
                with trio.move_on_after(poll_interval):
                    async for event in events:
                        data: Any = event["data"]
                        if event["event"] == "MIGRATION_PASS":
                            passes = int(data.get("pass", passes))
                        else:
                            status = data["status"]
                            if status in ("completed", "failed", "cancelled"):
                                break
                info = await source.execute("query-migrate")
                status = info.get("status", status)
                if progress is not None:
                    progress(info)
                if status in ("completed", "failed", "cancelled"):
                    break
                if options.postcopy and not postcopy_started and passes >= 1:
                    await source.execute("migrate-start-postcopy")
                    postcopy_started = True
                if trio.current_time() > deadline:
                    raise MigrationError(
                        f"migration to {uri} did not complete within {timeout:g} s "
                        f"({info.get('ram', {}).get('remaining', '?')} bytes remaining)",
                        hint="the guest dirties memory faster than it can be sent: raise "
                        "max_bandwidth or downtime_limit_ms, or use postcopy",
                    )
    except BaseException as exc:
        if isinstance(exc, MigrationError | trio.Cancelled | KeyboardInterrupt):
            with trio.CancelScope(shield=True):
                await _cancel_and_restore(source, was_running)
        raise
    if status != "completed":
        info = await source.execute("query-migrate")
        error = info.get("error-desc", "no reason given")
        with trio.CancelScope(shield=True):
            await _cancel_and_restore(source, was_running)
        raise MigrationError(
            f"migration to {uri} {status}: {error}; the source VM is still {await _status(source)}",
            hint="check that the destination is alive and listening",
        )
    info = await _final_info(source)
    stats = MigrationStats.from_query(
        info, passes=passes, wall_time_s=time.perf_counter() - started, warnings=warn
    )
    if stats.dirty_sync_count >= RISKY_DIRTY_SYNCS and await _accel_is_tcg(source):
        text = (
            f"this migration needed {stats.dirty_sync_count} dirty-bitmap syncs under TCG; "
            f"every corrupted guest seen on QEMU 7.2 came from a migration with "
            f">= {RISKY_DIRTY_SYNCS} syncs: verify the guest"
        )
        warnings.warn(text, MigrationWarning, stacklevel=2)
        stats.warnings.append(text)
    if dest is not None:
        await finish_incoming(dest, resume=was_running and resume_dest)
    return stats


async def finish_incoming(dest: QMPClient, *, resume: bool, timeout: float = 60.0) -> str:
    """Wait until the destination has loaded the incoming state; resume it if ``resume``.
    Returns its final run state.  Raises MigrationError if the load failed."""
    with trio.move_on_after(timeout):
        while (status := await _status(dest)) == "inmigrate":
            info = await dest.execute("query-migrate")
            if info.get("status") == "failed":
                raise MigrationError(
                    f"the destination failed to load the state: {info.get('error-desc', '?')}"
                )
            await trio.sleep(0.05)
        if resume and status != "running":
            await dest.execute("cont")
            status = await _status(dest)
        return status
    raise MigrationError(f"the destination did not finish loading within {timeout:g} s")


def exec_save_uri(path: str | Path) -> str:
    """A ``migrate`` URI that saves the VM state to ``path``."""
    return "exec:cat > " + shlex.quote(str(path))


def exec_restore_uri(path: str | Path) -> str:
    """A ``migrate-incoming`` URI that loads the VM state from ``path``."""
    return "exec:cat " + shlex.quote(str(path))


async def save_to_file(
    source: QMPClient, path: str | Path, *, progress: Progress | None = None
) -> MigrationStats:
    """Save the VM's state to ``path`` (the VM is left paused in ``postmigrate``, as after
    any migration; resume it with ``cont`` or shut it down)."""
    return await migrate(source, exec_save_uri(path), progress=progress)


async def restore_from_file(
    dest: QMPClient, path: str | Path, *, resume: bool = True, timeout: float = 120.0
) -> str:
    """Load a state saved by :func:`save_to_file` into an ``-incoming defer`` QEMU; resume
    it if ``resume``.  Returns the final run state."""
    if not Path(path).is_file():  # noqa: ASYNC240 - one local stat before QEMU reads it
        raise MigrationError(f"no saved state at {path}")
    await prepare_incoming(dest, exec_restore_uri(path))
    return await finish_incoming(dest, resume=resume, timeout=timeout)


async def guest_checksum(console: Any, path: str) -> str:
    """md5 of ``path`` inside the guest (``console`` is a :class:`SerialConsole`)."""
    out = await console.run(f"md5sum {shlex.quote(path)}")
    return str(out.split()[0])


def local_uri(dest: QemuMachine, transport: str = "unix") -> str:
    """A URI for migrating to ``dest`` on this host: a unix socket in its private
    directory, or ``tcp:127.0.0.1:0`` (QEMU picks the port)."""
    if transport == "unix":
        return f"unix:{dest._path('migrate.sock')}"
    if transport == "tcp":
        return "tcp:127.0.0.1:0"
    raise MigrationError(f"unknown transport {transport!r}", hint="use unix or tcp")


async def migrate_machine(
    source: QemuMachine,
    dest: QemuMachine,
    *,
    transport: str = "unix",
    options: MigrationOptions | None = None,
    progress: Progress | None = None,
    timeout: float = 600.0,
) -> MigrationStats:
    """Migrate ``source`` into ``dest`` (launched with ``incoming="defer"``) on this host;
    afterwards ``dest`` runs the guest and ``source`` is paused in ``postmigrate``."""
    if dest.incoming != "defer":
        raise MigrationError("the destination machine must be launched with incoming='defer'")
    uri = await prepare_incoming(dest.qmp, local_uri(dest, transport), options)
    return await migrate(
        source.qmp, uri, options=options, dest=dest.qmp, progress=progress, timeout=timeout
    )
