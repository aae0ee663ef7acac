"""The guest's serial console over a stream: expect / send_line / transcript, and running a
shell command in the guest kit's shell with its exit status.

A background task (started with :meth:`SerialConsole.start` in the caller's nursery)
reads everything the guest writes, so output is never lost between calls and QEMU never
blocks on a full socket.
"""

from __future__ import annotations

import codecs
import itertools
import re

import trio

from kvmkit.qemu.errors import ConsoleError, ConsoleTimeout

_TRANSCRIPT_LIMIT = 4 * 2**20


class SerialConsole:
    """A serial console attached to ``stream``.  Call :meth:`start` before use.

    ``expect`` consumes: each match moves a cursor past it, so successive expects see
    successive output.  ``transcript`` keeps everything (the last 4 MiB).
    """

    def __init__(self, stream: trio.abc.Stream, *, name: str = "console") -> None:
        self._stream = stream
        self._name = name
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""
        self._offset = 0  # chars dropped from the front of _text
        self._cursor = 0  # absolute position expect() searches from
        self._changed = trio.Event()
        self._closed = False
        self._send_lock = trio.Lock()
        self._run_lock = trio.Lock()
        self._serial = itertools.count(1)

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the reader task in ``nursery``; it ends when the stream closes."""
        nursery.start_soon(self._reader)

    async def _reader(self) -> None:
        try:
            while True:
                try:
                    chunk = await self._stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    chunk = b""
                if not chunk:
                    break
                self._append(self._decoder.decode(chunk))
        finally:
            self._closed = True
            self._wake()

    def _append(self, text: str) -> None:
        self._text += text
        excess = len(self._text) - _TRANSCRIPT_LIMIT
        if excess > 0:
            self._text = self._text[excess:]
            self._offset += excess
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    @property
    def transcript(self) -> str:
        """Everything the guest printed (the last 4 MiB)."""
        return self._text

    @property
    def closed(self) -> bool:
        return self._closed

    def tail(self, lines: int = 10) -> str:
        return "\n".join(self._text.splitlines()[-lines:])

    def skip_pending(self) -> None:
        """Forget output not yet consumed by ``expect``."""
        self._cursor = self._offset + len(self._text)

    async def expect(self, pattern: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """Wait until ``pattern`` (a regex) appears in output not consumed yet; return the
        match and consume output up to its end.  Raises ConsoleTimeout after ``timeout``
        seconds and ConsoleError when the console closes first."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        with trio.move_on_after(timeout):
            while True:
                start = max(self._cursor - self._offset, 0)
                match = regex.search(self._text, start)
                if match:
                    self._cursor = self._offset + match.end()
                    return match
                if self._closed:
                    raise ConsoleError(
                        f"{self._name} closed while waiting for {regex.pattern!r}; "
                        f"last output: {self.tail(3)!r}"
                    )
                await self._changed.wait()
        raise ConsoleTimeout(
            f"{self._name}: {regex.pattern!r} did not appear within {timeout:g} s; "
            f"last output: {self.tail(3)!r}"
        )

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConsoleError(f"{self._name} is closed; cannot send") from exc

    async def send_line(self, text: str) -> None:
        """Type ``text`` and Enter."""
        await self.send(text.encode() + b"\n")

    async def run(self, command: str, timeout: float = 30.0, *, check: bool = True) -> str:
        r"""Run ``command`` in the guest's shell and return its output (``\\r\\n`` folded to
        ``\\n``, without the echoed command line).  Raises ConsoleError when ``check`` and
        the command's status is not 0.  The guest must be at its shell prompt."""
        async with self._run_lock:
            n = next(self._serial)
            self.skip_pending()
            # The quotes split the markers in the echoed command line (which the shell's
            # line editor may also wrap), so only the real output matches below.
            sep = " " if command.rstrip().endswith("&") else "; "
            await self.send_line(
                f'echo "__KVMKIT_{n}""_BEGIN__"; {command}{sep}echo "__KVMKIT_{n}""_END__ $?"'
            )
            begin = await self.expect(re.compile(rf"__KVMKIT_{n}_BEGIN__\r?\n"), timeout)
            done = await self.expect(re.compile(rf"__KVMKIT_{n}_END__ (\d+)\r?\n"), timeout)
            output = self._text[begin.end() : done.start()]
        output = output.replace("\r\n", "\n").replace("\r", "")
        status = int(done.group(1))
        if check and status != 0:
            raise ConsoleError(
                f"guest command {command!r} exited with status {status}: {output.strip()[-300:]}"
            )
        return output

    async def aclose(self) -> None:
        await self._stream.aclose()
