"""The blocking facade (kvmkit.qmp.sync) against a real QEMU, from plain threads."""

from __future__ import annotations

import math
import os
import signal
import threading
from typing import Any

import pytest

from kvmkit.qmp import ConnectError, DisconnectedError, ExecuteError, QMPTimeoutError, SchemaError
from kvmkit.qmp.sync import connect


def test_sync_execute_events_and_errors(qemu: Any) -> None:
    with connect(qemu.socket) as qmp:
        assert qmp.greeting is not None
        assert qmp.execute("query-status")["status"] == "prelaunch"
        assert qmp.execute("query-status", timeout=math.inf)["running"] is False
        with pytest.raises(ExecuteError) as info:
            qmp.execute("no-such-command")
        assert info.value.error_class == "CommandNotFound"
        result, event = qmp.execute_and_wait("cont", event="RESUME", timeout=10)
        assert result == {} and event["event"] == "RESUME"
        with qmp.listen("STOP") as events:
            qmp.execute("stop")
            assert events.get(timeout=10)["event"] == "STOP"
            with pytest.raises(QMPTimeoutError):
                events.get(timeout=0.2)
        qmp.load_schema()
        with pytest.raises(SchemaError):
            qmp.execute("query-statsu")
        read_end, write_end = os.pipe()
        try:
            qmp.send_fd(write_end, "syncfd")
            assert qmp.execute("closefd", {"fdname": "syncfd"}) == {}
        finally:
            os.close(read_end)
            os.close(write_end)
    assert qmp.closed
    with pytest.raises(DisconnectedError):
        qmp.execute("query-status")


def test_sync_calls_from_many_threads(qemu: Any) -> None:
    results: dict[int, str] = {}
    with connect(qemu.socket) as qmp:

        def work(base: int) -> None:
            for i in range(base, base + 25):
                results[i] = qmp.execute("human-monitor-command", {"command-line": f"print {i}"})

        threads = [threading.Thread(target=work, args=(1 + n * 25,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert {i: r.strip() for i, r in results.items()} == {i: hex(i) for i in range(1, 201)}


def test_sync_connect_error_and_lost_connection(qemu: Any, tmp_path: Any) -> None:
    with pytest.raises(ConnectError):
        connect(tmp_path / "nothing.sock")
    with connect(qemu.socket) as qmp:
        qmp.execute("query-status")
        os.kill(qemu.pid, signal.SIGKILL)
        qemu.proc.wait(timeout=10)
        with pytest.raises(DisconnectedError):
            qmp.wait_event("STOP", timeout=10)
        with pytest.raises(DisconnectedError):
            qmp.execute("query-status")


def test_sync_listener_iterates_until_closed(qemu: Any) -> None:
    with connect(qemu.socket) as qmp, qmp.listen("STOP", "RESUME") as events:
        qmp.execute("cont")
        qmp.execute("stop")
        names = []
        for event in events:
            names.append(event["event"])
            if len(names) == 2:
                break
        assert names == ["RESUME", "STOP"]
        assert events.dropped == 0
