"""`kvmkit vm autostart --install-unit/--uninstall-unit` into a temporary unit folder,
checked by systemd's own `systemd-analyze verify` (never the real /etc/systemd)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmkit.cli import main
from kvmkit.domains import DomainError, autostart


def test_unit_install_verify_uninstall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state with space, 100%"
    monkeypatch.setenv("KVMKIT_STATE_DIR", str(state))
    units = tmp_path / "units"
    units.mkdir()
    assert main(["vm", "autostart", "--install-unit", "--unit-dir", str(units)]) == 0
    unit = units / autostart.UNIT_NAME
    text = unit.read_text()
    assert unit.stat().st_mode & 0o777 == 0o644
    assert f'ExecStart="{sys.executable}" "-m" "kvmkit" "vm" "autostart" "--run"' in text
    assert 'Environment="KVMKIT_STATE_DIR=' in text and "100%%" in text
    wanted = units / "multi-user.target.wants" / autostart.UNIT_NAME
    assert wanted.is_symlink() and wanted.resolve() == unit.resolve()

    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed: the unit was written but not verified")
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr
    assert autostart.UNIT_NAME not in verify.stderr, verify.stderr  # no warning about it

    assert main(["vm", "autostart", "--uninstall-unit", "--unit-dir", str(units)]) == 0
    assert not unit.exists() and not wanted.is_symlink()
    assert main(["vm", "autostart", "--uninstall-unit", "--unit-dir", str(units)]) == 0
    assert "was not installed" in capsys.readouterr().out


def test_unit_refuses_what_systemd_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(DomainError, match="newline"):
        autostart.unit_text(state_dir=tmp_path / "a\nb")
    with pytest.raises(DomainError, match="does not exist"):
        autostart.install_unit(tmp_path / "missing")
    assert autostart.systemd_quote('a"b\\c$d%e') == '"a\\"b\\\\c$$d%%e"'
