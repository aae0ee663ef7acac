"""`kvmkit vm start --display vnc`, `domdisplay`, `screenshot` against a real QEMU."""

from __future__ import annotations

import re
import shutil
import socket
import struct
from pathlib import Path

import pytest

from kvmkit.cli import main


def _vm(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["vm", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_vnc_display_and_screenshot(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    qemu_base: Path,
    guest_kit: object,
) -> None:
    state = qemu_base / "display-state"
    monkeypatch.setenv("KVMKIT_STATE_DIR", str(state))
    shot = qemu_base / "screen, with comma.png"
    try:
        status, out, err = _vm(capsys, "start", "scr", "--display", "vnc", "--quiet")
        assert status == 0, err
        status, uri, err = _vm(capsys, "domdisplay", "scr")
        assert status == 0, err
        match = re.fullmatch(r"vnc://127\.0\.0\.1:(\d+)\n", uri)
        assert match and f"display {uri.strip()}" in out
        port = int(match.group(1))
        assert 5900 <= port <= 5999
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            assert conn.recv(12).startswith(b"RFB 003.")  # a VNC server answers there

        status, out, err = _vm(capsys, "screenshot", "scr", str(shot))
        assert status == 0, err
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
        width, height = struct.unpack(">II", data[16:24])
        assert width >= 320 and height >= 200  # a real VGA screen

        status, _, err = _vm(capsys, "screenshot", "scr", str(qemu_base / "no/such/dir.png"))
        assert status != 0 and "not a directory" in err
        assert _vm(capsys, "destroy", "scr")[0] == 0

        # --display none overrides the definition's vnc for this run: no screen, and the
        # error says how to get one.
        assert _vm(capsys, "start", "scr", "--display", "none", "--quiet")[0] == 0
        status, _, err = _vm(capsys, "domdisplay", "scr")
        assert status != 0 and "--display vnc" in err
        status, _, err = _vm(capsys, "screenshot", "scr", str(shot))
        assert status != 0 and "--display vnc" in err
    finally:
        main(["vm", "destroy", "scr", "--undefine"])
        capsys.readouterr()
        shot.unlink(missing_ok=True)
        shutil.rmtree(state, ignore_errors=True)
