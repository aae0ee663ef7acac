"""SerialConsole over a trio memory stream: what a real guest cannot be made to do on cue
(silence until a timeout, a console that closes mid-expect, split UTF-8)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from kvmkit.qemu.console import SerialConsole
from kvmkit.qemu.errors import ConsoleError, ConsoleTimeout


async def test_expect_consumes_and_times_out() -> None:
    host, guest = trio.testing.memory_stream_pair()
    console = SerialConsole(host, name="test console")
    async with trio.open_nursery() as nursery:
        await console.start(nursery)
        await guest.send_all(b"boot... READY 1\r\nREADY 2\r\n")
        assert (await console.expect(r"READY (\d)", timeout=5)).group(1) == "1"
        assert (await console.expect(r"READY (\d)", timeout=5)).group(1) == "2"
        with pytest.raises(ConsoleTimeout, match="READY"):
            await console.expect(r"READY (\d)", timeout=0.2)
        # A UTF-8 character split across two chunks is decoded whole.
        snowman = "\u2603".encode()
        await guest.send_all(snowman[:1])
        await guest.send_all(snowman[1:] + b"\n")
        await console.expect("\u2603", timeout=5)
        assert console.transcript.startswith("boot... READY 1")
        await guest.aclose()
        with pytest.raises(ConsoleError, match="closed"):
            await console.expect("never", timeout=5)
        assert console.closed
        nursery.cancel_scope.cancel()


async def test_run_returns_output_and_status() -> None:
    host, guest = trio.testing.memory_stream_pair()
    console = SerialConsole(host)

    async def fake_shell() -> None:
        # Echo the command line (wrapped like busybox's line editor does), then answer.
        line = await guest.receive_some(4096)
        await guest.send_all(line[:30] + b"\r\r\n" + line[30:].replace(b"\n", b"\r\n"))
        marker = line.split(b'"')[1]  # __KVMKIT_<n>
        await guest.send_all(marker + b"_BEGIN__\r\nhello\r\nworld\r\n" + marker + b"_END__ 3\r\n")

    async with trio.open_nursery() as nursery:
        await console.start(nursery)
        nursery.start_soon(fake_shell)
        assert await console.run("printf x", check=False) == "hello\nworld\n"
        nursery.start_soon(fake_shell)
        with pytest.raises(ConsoleError, match="status 3"):
            await console.run("false")
        nursery.cancel_scope.cancel()
