"""A domain and its verbs, as libvirt's ``virDomain*`` calls sit on QEMU.

::

    store = DomainStore()
    dom = define(Definition("demo", memory_mib=512, boot=...), store)
    await dom.start()
    await dom.set_memory(384 * MiB, live=True, config=True)   # virsh setmem --live --config
    await dom.attach_disk("/srv/b.qcow2", target="vdb", live=True, config=True)
    await dom.shutdown()

Live/config is a flag on each verb, as ``VIR_DOMAIN_AFFECT_LIVE|CONFIG`` is in libvirt:
``live`` changes the running QEMU over QMP, ``config`` the definition for the next start;
when neither is given, the verb affects the running QEMU if there is one, else the
definition (virsh's ``--current``).  QEMU is launched and stopped only through
:class:`kvmkit.qemu.QemuMachine` (its one launch and shutdown ladder): ``start`` launches
it detached and records its identity; ``shutdown``/``destroy`` adopt the recorded process
after checking it is still that QEMU, so a stale PID never reaches another process.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from kvmkit.domains import disks, mirror
from kvmkit.domains.definition import (
    MAX_VCPUS,
    MIB,
    Definition,
    Disk,
    Nic,
    check_finite,
    check_mac,
    mib_from_bytes,
    new_mac,
    validate_name,
)
from kvmkit.domains.errors import DefinitionError, DomainError, UntrustedStateError
from kvmkit.domains.process import Identity, TrustedProcess
from kvmkit.domains.store import DomainStore, RunState
from kvmkit.qemu import guestkit, hotplug, migration, snapshot
from kvmkit.qemu.config import DISPLAYS, nic_id
from kvmkit.qemu.console import SerialConsole
from kvmkit.qemu.errors import ConsoleTimeout
from kvmkit.qemu.machine import QemuMachine
from kvmkit.qmp import ExecuteError, QMPClient, QMPError, open_qmp


@dataclass
class StartReport:
    """What ``start`` did: the QEMU's PID, its accelerator and why, whether the guest
    kit said it was ready (None when the guest is not the kit or nobody waited)."""

    pid: int
    accel: str
    accel_reason: str
    ready: bool | None


def _affect(live: bool | None, config: bool | None, running: bool, name: str) -> tuple[bool, bool]:
    """Virsh's ``--live``/``--config``/``--current``: which of the two to change."""
    if not live and not config:
        return running, not running
    if live and not running:
        raise DomainError(f"domain {name} is not running", hint="drop --live, or start it")
    return bool(live), bool(config)


async def vnc_uri(qmp: QMPClient) -> str | None:
    """``vnc://HOST:PORT`` of the QEMU's VNC server (``query-vnc``), None without one."""
    vnc = await qmp.execute("query-vnc")
    if not vnc.get("enabled") or not vnc.get("service"):
        return None
    host = str(vnc.get("host", "127.0.0.1"))
    return f"vnc://{'[' + host + ']' if ':' in host else host}:{vnc['service']}"


def _check_count(count: int) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_VCPUS:
        raise DefinitionError(f"vCPU count {count!r} is out of range [1, {MAX_VCPUS}]")
    return count


def _pick_nic(macs: list[str], mac: str | None, name: str) -> str:
    """The MAC in ``macs`` that ``mac`` names (or the only one)."""
    if mac is None:
        if len(macs) != 1:
            raise DomainError(f"domain {name} has {len(macs)} NICs", hint="name one with --mac")
        return macs[0]
    if mac not in macs:
        raise DomainError(f"domain {name} has no NIC with MAC {mac}", hint="see domiflist")
    return mac


def _check_display(display: str) -> None:
    if display not in DISPLAYS:
        raise DefinitionError(f"display is {display!r}; use one of {', '.join(DISPLAYS)}")


def _prints_ready_marker(definition: Definition) -> bool:
    """True when the guest announces itself with the guest kit's ready marker: it boots
    the kit, or a disk installed from kvmkit's installer ISO."""
    boot = definition.boot
    if boot.kind == "disk":
        return boot.ready_marker
    return bool(boot.initrd) and Path(str(boot.initrd)).is_relative_to(guestkit.kits_dir())


class Domain:
    """One defined domain in ``store``.  Verbs that change it take the domain's lock."""

    def __init__(self, name: str, store: DomainStore | None = None) -> None:
        self.name = validate_name(name)
        self.store = store or DomainStore()
        if not self.store.exists(name):
            raise DomainError(f"no domain named {name}", hint="see `kvmkit vm list`")

    # -- definition and state ----------------------------------------------------------------

    @property
    def definition(self) -> Definition:
        return self.store.load_definition(self.name)

    @property
    def folder(self) -> Path:
        return self.store.folder(self.name)

    def dumpconfig(self) -> dict[str, Any]:
        """The definition as its JSON file holds it."""
        return self.definition.to_json()

    def _running(self) -> tuple[RunState | None, TrustedProcess | None]:
        return self.store.find_process(self.name)

    def run_state(self) -> RunState | None:
        """The state of the running QEMU, None when none runs (a stale record counts as
        none).  Raises UntrustedStateError for a state file it cannot trust."""
        state, proc = self._running()
        if proc is None:
            return None
        proc.close()
        return state

    def is_active(self) -> bool:
        return self.run_state() is not None

    def run_path(self, name: str) -> Path:
        """A file of the running QEMU: ``qmp.sock``, ``console.sock``, ``qemu.log``"""
        state = self.run_state()
        if state is None:
            raise DomainError(f"domain {self.name} is not running", hint="start it first")
        return self.folder / state.run_dir / name

    async def state(self) -> str:
        """``running``/``paused``/... (QEMU's run state), ``shut off``, or ``dead`` (a
        recorded QEMU that is gone; ``cleanup`` or the next ``start`` forgets it)."""
        state, proc = self._running()
        if state is None:
            return "shut off"
        if proc is None:
            return "dead"
        proc.close()
        try:
            async with self.qmp(timeout=2.0) as qmp:
                return str((await qmp.execute("query-status"))["status"])
        except (QMPError, OSError):
            return "running (QMP busy)"

    async def summary(self) -> dict[str, Any]:
        """One row of ``list``: name, state, PID, max memory, vCPUs, autostart.  A domain
        whose state file cannot be trusted shows as ``untrusted state`` here, one whose
        definition cannot be read as ``bad definition``."""
        try:
            definition = self.definition
        except DefinitionError:
            return {"name": self.name, "state": "bad definition", "pid": None}
        try:
            state, run = await self.state(), self.run_state()
        except UntrustedStateError:
            state, run = "untrusted state", None
        return {
            "name": self.name,
            "state": state,
            "pid": run.identity.pid if run else None,
            "memory_mib": definition.memory_mib,
            "cpus": definition.vcpus,
            "autostart": definition.autostart,
        }

    @contextlib.asynccontextmanager
    async def qmp(self, timeout: float = 5.0) -> AsyncIterator[QMPClient]:
        """A QMP connection to the running QEMU (one client at a time: keep it short)."""
        async with open_qmp(self.run_path("qmp.sock"), connect_timeout=timeout) as qmp:
            yield qmp

    def cleanup(self) -> bool:
        """Forget a recorded QEMU that is gone; True when there was one to forget."""
        with self.store.lock(self.name):
            state, proc = self._running()
            if state is None or proc is not None:
                if proc is not None:
                    proc.close()
                return False
            self.store.clear_state(self.name, state)
            return True

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, *, wait_ready: float = 60.0, display: str | None = None) -> StartReport:
        """Launch QEMU from the definition, detached; record it; wait up to
        ``wait_ready`` s for the guest kit's ready marker (0: don't); then set the
        balloon to the definition's current memory.  ``display`` (``none``/``vnc``)
        overrides the definition's display for this run.  Refuses when a QEMU runs or
        the state file cannot be trusted."""
        check_finite(wait_ready, "wait_ready (s)", 0, 3600)
        if display is not None:
            _check_display(display)
        with self.store.lock(self.name):
            state, proc = self._running()
            if proc is not None:
                proc.close()
                raise DomainError(f"domain {self.name} is already running")
            if state is not None:
                self.store.clear_state(self.name, state)  # its QEMU is gone
            definition = self.definition
            if display is not None:
                definition.display = display
            machine = QemuMachine(
                definition.machine_config(),
                directory=self.store.new_run_dir(self.name),
                detached=True,
                console_log=self.folder / "console.log",
            )
            await machine.launch()
            try:
                report = await self._record_and_settle(machine, definition, wait_ready)
            except BaseException:
                # kill() shields itself; it must run at the nesting level of launch().
                await machine.kill()
                self.store.clear_state(self.name, None)
                raise
            await machine.detach()
            return report

    async def _record_and_settle(
        self, machine: QemuMachine, definition: Definition, wait_ready: float
    ) -> StartReport:
        assert machine.pid is not None and machine.directory is not None
        state = RunState(
            Identity.of(machine.pid),
            machine.directory.name,
            machine.config,
            machine.accel.name,
            machine.accel.reason,
            machine.started_at or 0.0,
        )
        self.store.write_state(self.name, state)
        ready: bool | None = None
        if wait_ready > 0 and _prints_ready_marker(definition):
            try:
                await machine.wait_ready(wait_ready)
                ready = True
            except ConsoleTimeout:
                ready = False
        if definition.current_mib < definition.memory_mib:
            if ready:
                await hotplug.set_balloon(machine.qmp, definition.current_mib)
            else:  # the guest's driver takes the target when it loads
                await machine.qmp.execute("balloon", {"value": definition.current_mib * MIB})
        return StartReport(machine.pid, machine.accel.name, machine.accel.reason, ready)

    async def _stop(self, graceful: bool, timeout: float) -> str:
        check_finite(timeout, "timeout (s)", 0, 3600)
        with self.store.lock(self.name, timeout=max(30.0, timeout + 20)):
            state, proc = self._running()
            if state is None:
                return "not running"
            if proc is None:
                self.store.clear_state(self.name, state)
                return "not running (its recorded QEMU was gone; record cleared)"
            try:
                machine = QemuMachine.adopt(
                    state.config, self.folder / state.run_dir, proc, powerdown_timeout=timeout
                )
                await machine.shutdown(graceful=graceful)
            finally:
                proc.close()
            self.store.clear_state(self.name, state)
            return machine.shutdown_step or "exited"

    async def shutdown(self, *, timeout: float = 30.0) -> str:
        """ACPI power-off, then the rest of the ladder; returns the rung that ended it."""
        return await self._stop(True, timeout)

    async def destroy(self) -> str:
        """Stop at once: quit, SIGTERM, SIGKILL (no power-off)."""
        return await self._stop(False, 5.0)

    async def suspend(self) -> None:
        async with self.qmp() as qmp:
            if (await qmp.execute("query-status"))["status"] != "paused":
                await qmp.execute_and_wait("stop", event="STOP", timeout=10)

    async def resume(self) -> None:
        async with self.qmp() as qmp:
            if (await qmp.execute("query-status"))["status"] != "running":
                await qmp.execute_and_wait("cont", event="RESUME", timeout=10)

    def undefine(self) -> None:
        """Remove the definition and the domain's folder (refused while it runs)."""
        with self.store.lock(self.name):
            if self.is_active():
                raise DomainError(f"domain {self.name} is running", hint="destroy it first")
        self.store.remove(self.name)

    def set_autostart(self, on: bool) -> None:
        self._change_definition(autostart=on)

    def _change_definition(self, **values: Any) -> Definition:
        with self.store.lock(self.name):
            definition = self.definition
            for key, value in values.items():
                setattr(definition, key, value)
            self.store.save_definition(definition)
            return definition

    # -- memory --------------------------------------------------------------------------------

    async def set_memory(
        self, size: int, *, live: bool | None = None, config: bool | None = None
    ) -> float | None:
        """Virsh ``setmem``: ``size`` bytes (whole MiB) as the balloon target of the running
        guest (``live``) and/or the memory after the next start (``config``).  Returns the
        guest's actual size in MiB after a live change."""
        mib = mib_from_bytes(size, "memory")
        definition = self.definition
        if mib > definition.memory_mib:
            raise DomainError(
                f"{mib} MiB is above the maximum memory of {definition.memory_mib} MiB",
                hint="raise it first with setmaxmem (applies at the next start)",
            )
        live, config = _affect(live, config, self.is_active(), self.name)
        actual = None
        if live:
            async with self.qmp() as qmp:
                actual = await hotplug.set_balloon(qmp, mib)
        if config:
            self._change_definition(current_memory_mib=mib)
        return actual

    def set_max_memory(self, size: int) -> Definition:
        """Virsh ``setmaxmem --config``: the RAM QEMU boots with from the next start; the
        current memory is lowered to it when above."""
        mib = mib_from_bytes(size, "maximum memory")
        current = min(self.definition.current_mib, mib)
        return self._change_definition(memory_mib=mib, current_memory_mib=current)

    # -- disks ---------------------------------------------------------------------------------

    async def block_list(self, *, inactive: bool = False) -> list[dict[str, Any]]:
        """Virsh ``domblklist``: target and source of each disk, from the running QEMU
        (its block nodes) or, when shut off or ``inactive``, from the definition."""
        if inactive or not self.is_active():
            return [{"target": d.target, "source": d.source} for d in self.definition.disks]
        async with self.qmp() as qmp:
            return await disks.live_disks(qmp)

    async def attach_disk(
        self,
        source: str | Path,
        *,
        target: str | None = None,
        fmt: str | None = None,
        readonly: bool = False,
        live: bool | None = None,
        config: bool | None = None,
    ) -> Disk:
        """Virsh ``attach-disk``: hot-add ``source`` as ``target`` (default: the first free
        ``vdX``) and/or add it to the definition."""
        live, config = _affect(live, config, self.is_active(), self.name)
        with self.store.lock(self.name):
            definition = self.definition
            taken: set[str] = set()
            if live:
                async with self.qmp() as qmp:
                    taken = {d["target"] for d in await disks.live_disks(qmp)}
            disk = disks.new_disk(definition, source, target, fmt, readonly, taken)
            if live:
                async with self.qmp() as qmp:
                    await hotplug.add_disk(
                        qmp, disk.source, fmt=disk.format, disk_id=disk.target, readonly=readonly
                    )
            if config:
                definition.disks.append(disk)
                self.store.save_definition(definition)
            return disk

    async def detach_disk(
        self,
        target: str | None = None,
        *,
        source: str | Path | None = None,
        live: bool | None = None,
        config: bool | None = None,
        timeout: float = 15.0,
    ) -> str:
        """Virsh ``detach-disk``: remove the disk named by ``target`` (``vdb``) or by its
        ``source`` path from the running guest (waits for DEVICE_DELETED) and/or the
        definition.  Returns the target."""
        check_finite(timeout, "timeout (s)", 0, 3600)
        live, config = _affect(live, config, self.is_active(), self.name)
        with self.store.lock(self.name):
            definition = self.definition
            if live:
                async with self.qmp() as qmp:
                    found = disks.find(await disks.live_disks(qmp), target, source)
                    await hotplug.remove_disk(qmp, found, timeout=timeout)
            if config:
                listed = [{"target": d.target, "source": d.source} for d in definition.disks]
                found = disks.find(listed, target, source)
                definition.disks = [d for d in definition.disks if d.target != found]
                self.store.save_definition(definition)
            return found

    # -- vCPUs and NICs ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _guest_console(self) -> AsyncIterator[SerialConsole | None]:
        """The serial console when the guest runs kvmkit's shell there, else None."""
        if not _prints_ready_marker(self.definition):
            yield None
            return
        console = SerialConsole(await self.open_console(), name=f"{self.name} console")
        async with trio.open_nursery() as nursery:
            await console.start(nursery)
            try:
                yield console
            finally:
                await console.aclose()

    async def set_vcpus(
        self,
        count: int,
        *,
        live: bool | None = None,
        config: bool | None = None,
        maximum: bool = False,
    ) -> int:
        """Virsh ``setvcpus``: plug CPUs into the running guest until it has ``count``
        (``live``; waits until the guest has them online when it runs kvmkit's shell)
        and/or set the vCPUs of the next start (``config``); with ``maximum``, the
        hotplug ceiling of the next start instead (config only).  Unplugging is refused
        where QEMU cannot do it safely (TCG on QEMU <= 7.2).  Returns the vCPUs now."""
        count = _check_count(count)
        if maximum:
            if live:
                raise DomainError("--maximum changes the definition only", hint="drop --live")
            definition = self.definition
            vcpus = min(definition.vcpus, count)
            self._change_definition(max_vcpus=count, vcpus=vcpus)
            return vcpus
        live, config = _affect(live, config, self.is_active(), self.name)
        ceiling = self.definition.max_vcpus or self.definition.vcpus
        if config and count > ceiling:
            raise DomainError(
                f"{count} vCPUs is above the maximum of {ceiling}",
                hint="raise it with setvcpus NAME N --maximum --config (next start)",
            )
        now = count
        if live:
            now = await self._set_live_vcpus(count)
        if config:
            self._change_definition(vcpus=count)
        return now

    async def _set_live_vcpus(self, count: int) -> int:
        with self.store.lock(self.name):
            async with self.qmp() as qmp:
                cpus = await hotplug.hotpluggable_cpus(qmp)
                plugged = [c for c in cpus if "qom-path" in c]
                if count > len(cpus):
                    raise DomainError(
                        f"{count} vCPUs is above this QEMU's maximum of {len(cpus)}",
                        hint="setvcpus NAME N --maximum --config, then restart",
                    )
                if count < len(plugged):
                    hot = [c["qom-path"].rsplit("/", 1)[-1] for c in plugged]
                    hot = [h for h in hot if not h.startswith("device[")]  # boot CPUs
                    if len(plugged) - count > len(hot):
                        raise DomainError(
                            f"only hot-plugged vCPUs can be unplugged ({len(hot)} here)",
                            hint="setvcpus --config and restart to boot with fewer",
                        )
                    for cpu_id in hot[::-1][: len(plugged) - count]:
                        await hotplug.remove_cpu(qmp, cpu_id)
                    return count
                if count == len(plugged):
                    return count
                async with self._guest_console() as console:
                    for _ in range(count - len(plugged)):
                        await hotplug.add_cpu(qmp, console=console)
                return count

    async def interfaces(self, *, inactive: bool = False) -> list[dict[str, Any]]:
        """Virsh ``domiflist``: MAC, type and model of each NIC (running QEMU's, or the
        definition's when shut off or ``inactive``)."""
        if inactive or not self.is_active():
            return [
                {"mac": n.mac, "type": n.network, "model": n.model} for n in self.definition.nics
            ]
        async with self.qmp() as qmp:
            found = await hotplug.nic_devices(qmp)
        return [{"mac": n["mac"], "type": "user", "model": "virtio", "id": n["id"]} for n in found]

    async def attach_interface(
        self,
        *,
        type: str = "user",
        model: str = "virtio",
        mac: str | None = None,
        live: bool | None = None,
        config: bool | None = None,
        timeout: float = 20.0,
    ) -> Nic:
        """Virsh ``attach-interface``: a virtio NIC on a user-mode network, hot-added
        (``live``; waits until the guest sees it when it runs kvmkit's shell) and/or in
        the definition (``config``).  ``mac`` defaults to a new random one."""
        check_finite(timeout, "timeout (s)", 0, 3600)
        live, config = _affect(live, config, self.is_active(), self.name)
        with self.store.lock(self.name):
            definition = self.definition
            taken = {n.mac for n in definition.nics if n.mac}
            if live:
                async with self.qmp() as qmp:
                    taken |= {n["mac"] for n in await hotplug.nic_devices(qmp)}
            nic = Nic(model=model, network=type, mac=check_mac(mac) if mac else new_mac(taken))
            nic.validate()
            if nic.mac in taken:
                raise DomainError(f"domain {self.name} has a NIC with MAC {nic.mac} already")
            if config:
                definition.nics.append(nic)
                definition.validate()  # the NIC limit, before anything is plugged
            if live:
                assert nic.mac is not None
                async with self.qmp() as qmp, self._guest_console() as console:
                    await hotplug.add_nic(
                        qmp, nic_id=nic_id(nic.mac), mac=nic.mac, console=console,
                        timeout=timeout,
                    )  # fmt: skip
            if config:
                self.store.save_definition(definition)
            return nic

    async def detach_interface(
        self,
        *,
        type: str = "user",
        mac: str | None = None,
        live: bool | None = None,
        config: bool | None = None,
        timeout: float = 15.0,
    ) -> str:
        """Virsh ``detach-interface``: remove the NIC with ``mac`` (may be left out when
        there is only one) from the running guest (waits for DEVICE_DELETED) and/or the
        definition.  Returns its MAC."""
        check_finite(timeout, "timeout (s)", 0, 3600)
        if type != "user":
            raise DomainError(f"interface type {type!r}", hint="kvmkit has --type user")
        live, config = _affect(live, config, self.is_active(), self.name)
        mac = check_mac(mac) if mac else None
        with self.store.lock(self.name):
            definition = self.definition
            found = mac
            if live:
                async with self.qmp() as qmp:
                    nics = await hotplug.nic_devices(qmp)
                    chosen = _pick_nic([n["mac"] for n in nics], mac, self.name)
                    device = next(n["id"] for n in nics if n["mac"] == chosen)
                    await hotplug.remove_nic(qmp, device, timeout=timeout)
                    found = chosen
            if config:
                listed = [n.mac or "" for n in definition.nics]
                chosen = _pick_nic(listed, found, self.name)
                definition.nics = [n for n in definition.nics if (n.mac or "") != chosen]
                self.store.save_definition(definition)
                found = chosen
            return found or ""

    # -- information ---------------------------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        """Virsh ``dominfo``: name, state, CPUs, max memory, used memory, persistent,
        autostart; plus PID and accelerator while it runs."""
        definition = self.definition
        state = self.run_state()
        info: dict[str, Any] = {
            "name": self.name,
            "state": await self.state(),
            "cpus": definition.vcpus,
            "max_memory_mib": definition.memory_mib,
            "used_memory_mib": definition.current_mib,
            "persistent": True,
            "autostart": definition.autostart,
            "pid": state.identity.pid if state else None,
            "accel": state.accel if state else None,
        }
        if state is not None:  # what runs, not what the next start will give
            info["max_memory_mib"] = state.config.memory_mib
            async with self.qmp() as qmp:
                info["cpus"] = len(await qmp.execute("query-cpus-fast"))
                with contextlib.suppress(ExecuteError):
                    info["used_memory_mib"] = (await qmp.execute("query-balloon"))["actual"] // MIB
        return info

    # -- display -----------------------------------------------------------------------------

    async def display_uri(self) -> str:
        """Virsh ``domdisplay``: the running guest's VNC address, ``vnc://127.0.0.1:5900``
        (a port; QEMU listens on the loopback only).  DomainError when it has none."""
        async with self.qmp() as qmp:
            uri = await vnc_uri(qmp)
        if uri is None:
            raise DomainError(
                f"domain {self.name} has no graphical display",
                hint="start it with --display vnc",
            )
        return uri

    async def screenshot(self, out: str | Path) -> Path:
        """Virsh ``screenshot``: the guest's screen as a PNG file at ``out`` (QMP
        ``screendump`` with ``format: png``, QEMU >= 7.1), replaced atomically."""
        target = Path(out).absolute()  # noqa: ASYNC240 - getcwd, no disk access
        if not target.parent.is_dir():  # noqa: ASYNC240 - one local stat, checked up front
            raise DomainError(f"{target.parent} is not a directory")
        shot = self.run_path("screen.png")  # QEMU writes into its own run folder
        try:
            async with self.qmp() as qmp:
                if not (await qmp.execute("query-vnc")).get("enabled"):
                    raise DomainError(
                        f"domain {self.name} has no screen", hint="start it with --display vnc"
                    )
                await qmp.execute("screendump", {"filename": str(shot), "format": "png"})
            shutil.move(str(shot), str(target))
        finally:
            shot.unlink(missing_ok=True)
        return target

    # -- console and QMP -----------------------------------------------------------------------

    async def open_console(self) -> trio.SocketStream:
        """A stream to the guest's serial console (one client at a time)."""
        return await trio.open_unix_socket(str(self.run_path("console.sock")))

    async def console_run(self, command: str, *, timeout: float = 30.0) -> str:
        """Run one shell command on the guest kit's console; returns its output."""
        check_finite(timeout, "timeout (s)", 0, 3600)
        console = SerialConsole(await self.open_console(), name=f"{self.name} console")
        async with trio.open_nursery() as nursery:
            await console.start(nursery)
            try:
                return await console.run(command, timeout=timeout, check=False)
            finally:
                await console.aclose()

    async def qmp_command(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Send one QMP command; ExecuteError when QEMU refuses it."""
        async with self.qmp() as qmp:
            return await qmp.execute(command, arguments)

    # -- snapshots -----------------------------------------------------------------------------

    def _snapshot_nodes(self) -> tuple[str, list[str]]:
        chosen = [d.target for d in self.definition.disks if d.format == "qcow2" and not d.readonly]
        if not chosen:
            raise DomainError(
                f"domain {self.name} has no writable qcow2 disk to hold snapshots",
                hint="attach one with attach-disk --persistent",
            )
        return chosen[0], chosen

    async def snapshot_create(self, tag: str) -> None:
        vmstate, devices = self._snapshot_nodes()
        async with self.qmp() as qmp:
            await snapshot.save(qmp, tag, vmstate=vmstate, devices=devices)

    async def snapshot_revert(self, tag: str) -> None:
        vmstate, devices = self._snapshot_nodes()
        async with self.qmp() as qmp:
            await snapshot.load(qmp, tag, vmstate=vmstate, devices=devices)

    async def snapshot_delete(self, tag: str) -> None:
        _, devices = self._snapshot_nodes()
        async with self.qmp() as qmp:
            await snapshot.delete(qmp, tag, devices=devices)

    async def snapshot_list(self) -> list[dict[str, Any]]:
        vmstate, _ = self._snapshot_nodes()
        async with self.qmp() as qmp:
            return await snapshot.list_snapshots(qmp, vmstate)

    # -- clone and migrate ---------------------------------------------------------------------

    def clone(self, new_name: str, *, linked: bool = False) -> Domain:
        """A new domain with a copy of this definition and of its disks (qcow2 overlays
        on them when ``linked``); refused while this one runs."""
        with self.store.lock(self.name):
            if self.is_active():
                raise DomainError(
                    f"domain {self.name} is running",
                    hint="shut it down first (disks must be quiet)",
                )
            disks.clone_domain(self.store, self.definition, new_name, linked=linked)
        return Domain(new_name, self.store)

    async def migrate(
        self,
        uri: str | None = None,
        *,
        options: migration.MigrationOptions | None = None,
        progress: migration.Progress | None = None,
    ) -> migration.MigrationStats:
        """Live-migrate to ``uri``, or (default) to a new local QEMU that then becomes the
        domain's QEMU; the old one is stopped.  On failure or cancellation the source
        keeps running and the half-made destination is gone."""
        with self.store.lock(self.name, timeout=30):
            state, proc = self._running()
            if state is None or proc is None:
                raise DomainError(f"domain {self.name} is not running", hint="start it first")
            try:
                if uri is not None:
                    async with self.qmp() as src:
                        return await migration.migrate(src, uri, options=options, progress=progress)
                stats = await self._migrate_local(state, options, progress)
                old = QemuMachine.adopt(state.config, self.folder / state.run_dir, proc)
                await old.shutdown(graceful=False)  # paused in postmigrate: quit
                return stats
            finally:
                proc.close()

    async def _migrate_local(
        self,
        state: RunState,
        options: migration.MigrationOptions | None,
        progress: migration.Progress | None,
    ) -> migration.MigrationStats:
        """Launch a destination with the source's devices (its launch configuration, and
        the disks, NICs and CPUs hot-added since: :mod:`.mirror`), migrate into it, and
        record it as the domain's QEMU."""
        async with self.qmp() as src:
            hot = await mirror.hot_devices(src, state.config)
        config = hot.config
        dest = QemuMachine(
            config,
            directory=self.store.new_run_dir(self.name, keep=state.run_dir),
            detached=True,
            incoming="defer",
            console_log=self.folder / "console.log",
        )
        await dest.launch()
        try:
            await mirror.replay(dest.qmp, hot)
            async with self.qmp() as src:
                uri = await migration.prepare_incoming(dest.qmp, migration.local_uri(dest), options)
                stats = await migration.migrate(
                    src, uri, options=options, dest=dest.qmp, progress=progress
                )
            assert dest.pid is not None and dest.directory is not None
            new_state = RunState(
                Identity.of(dest.pid), dest.directory.name, config, dest.accel.name,
                dest.accel.reason, dest.started_at or 0.0,
            )  # fmt: skip
            self.store.write_state(self.name, new_state)  # from here on, dest is the domain
        except BaseException:
            await dest.kill()  # shields itself; must run at the nesting level of launch()
            raise
        await dest.detach()
        return stats


# -- the collection ------------------------------------------------------------------------------


def define(definition: Definition, store: DomainStore | None = None) -> Domain:
    """Store a new domain's definition (virsh ``define``); DomainError if the name is
    taken."""
    store = store or DomainStore()
    definition.validate()
    if store.exists(definition.name):
        raise DomainError(f"a domain named {definition.name} already exists")
    store.save_definition(definition)
    return Domain(definition.name, store)


def list_domains(store: DomainStore | None = None) -> list[Domain]:
    store = store or DomainStore()
    return [Domain(name, store) for name in store.names()]


async def start_autostart(
    store: DomainStore | None = None, *, wait_ready: float = 0.0
) -> list[str]:
    """Start every domain marked autostart that is not running (what a host runs at boot;
    ``wait_ready`` as for :meth:`Domain.start`); returns their names."""
    started = []
    for domain in list_domains(store):
        if domain.definition.autostart and not domain.is_active():
            await domain.start(wait_ready=wait_ready)
            started.append(domain.name)
    return started
