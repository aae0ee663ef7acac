"""kvmkit.containers against real LXC: every verb, the two network modes, every error."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmkit.containers import (
    Container,
    ContainerExistsError,
    ContainerOutputError,
    ContainerStateError,
    InvalidNameError,
    LxcCommandError,
    LxcUnavailableError,
    NoSuchContainerError,
    TemplateNotFoundError,
    list_containers,
)

MakeContainer = Callable[..., Container]
NewName = Callable[[str], str]


def test_lifecycle(make_container: MakeContainer, lxcpath: Path) -> None:
    ct = make_container("life")
    assert ct.defined and ct.state == "STOPPED"
    assert ct.info().pid is None and ct.info().memory_bytes is None
    ct.start()
    info = ct.info()
    assert info.state == "RUNNING" and info.pid is not None and info.pid > 1
    assert info.memory_bytes is not None and info.memory_bytes > 0
    assert info.network == "none" and info.ips == [] and info.veth is None
    # the container shares the host's kernel
    assert ct.attach(["uname", "-r"]) == (0, os.uname().release + "\n")
    assert ct.attach(["sh", "-c", "echo out; echo err >&2; exit 3"]) == (3, "out\nerr\n")
    # its init runs in its own PID namespace as PID 1
    assert ct.attach(["sh", "-c", "echo $$; cat /proc/1/comm"])[1].split()[1] == "init"
    deadline = time.monotonic() + 10
    while "Please press Enter" not in ct.console_log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "Please press Enter to activate this console" in ct.console_log()
    assert [i.name for i in list_containers(lxcpath)] == [ct.name]
    ct.stop()
    assert ct.state == "STOPPED" and ct.info().pid is None
    ct.destroy()
    assert not ct.defined and not ct.directory.exists()
    assert list_containers(lxcpath) == []


def test_no_network_by_default(make_container: MakeContainer) -> None:
    ct = make_container("nonet", start=True)
    status, out = ct.attach(["cat", "/proc/net/dev"])
    assert status == 0
    interfaces = [line.split(":")[0].strip() for line in out.splitlines()[2:]]
    assert interfaces == ["lo"]


def test_veth_network(make_container: MakeContainer) -> None:
    ct = make_container("veth", network="veth", start=True)
    info = ct.info()
    assert info.network == "veth" and info.veth == ct.veth_name
    assert len(info.ips) == 1 and info.ips[0].startswith("10.254.")
    assert Path(f"/sys/class/net/{ct.veth_name}").exists()
    # the host reaches a server in the container through the routed veth
    port = 20000 + os.getpid() % 20000
    ct.attach(["sh", "-c", f"nc -l -p {port} -e echo hello-from-ct >/dev/null 2>&1 &"])
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection((info.ips[0], port), timeout=2) as sock:
                assert sock.recv(64) == b"hello-from-ct\n"
                break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, "the container's listener never came up"
            time.sleep(0.05)
    ct.stop()
    assert not Path(f"/sys/class/net/{ct.veth_name}").exists()


def test_two_veth_containers_get_different_addresses(make_container: MakeContainer) -> None:
    a = make_container("va", network="veth")
    b = make_container("vb", network="veth")
    assert a.info().veth != b.info().veth
    addr = [c._config_items()["lxc.net.0.ipv4.address"] for c in (a, b)]
    assert addr[0] != addr[1]


def test_name_taken(make_container: MakeContainer, lxcpath: Path) -> None:
    ct = make_container("taken")
    with pytest.raises(ContainerExistsError, match="already exists") as err:
        Container(ct.name, lxcpath).create()
    assert "destroy" in str(err.value)


def test_template_missing_leaves_nothing(lxcpath: Path, new_name: NewName) -> None:
    ct = Container(new_name("tmpl"), lxcpath)
    with pytest.raises(TemplateNotFoundError, match="no template 'no-such-template'"):
        ct.create("no-such-template")
    assert not ct.directory.exists()
    with pytest.raises(TemplateNotFoundError, match="not an executable"):
        ct.create("/nonexistent/lxc-template")


def test_invalid_name(lxcpath: Path) -> None:
    for bad in ("", "a b", "-x", "../etc", "x" * 65):
        with pytest.raises(InvalidNameError):
            Container(bad, lxcpath)


@pytest.mark.parametrize("verb", ["start", "stop", "destroy", "info", "attach", "console"])
def test_no_such_container(lxcpath: Path, verb: str, new_name: NewName) -> None:
    ct = Container(new_name("ghost"), lxcpath)
    args = (["true"],) if verb == "attach" else ()
    with pytest.raises(NoSuchContainerError, match="create it first"):
        getattr(ct, verb)(*args)


def test_state_errors(make_container: MakeContainer) -> None:
    ct = make_container("state")
    with pytest.raises(ContainerStateError, match="not running"):
        ct.attach(["true"])
    with pytest.raises(ContainerStateError, match="not running"):
        ct.stop()
    ct.start()
    with pytest.raises(ContainerStateError, match="already running"):
        ct.start()
    with pytest.raises(ContainerStateError, match="is running"):
        ct.destroy()
    with pytest.raises(ContainerStateError, match="needs a command"):
        ct.attach([])
    ct.destroy(force=True)
    assert not ct.defined


def test_attach_limits(make_container: MakeContainer) -> None:
    ct = make_container("limits", start=True)
    with pytest.raises(ContainerOutputError, match="more than 1,000 bytes"):
        ct.attach(["head", "-c", "100000", "/dev/zero"], max_output=1000)
    with pytest.raises(LxcCommandError, match="timed out") as err:
        ct.attach(["sleep", "60"], timeout=0.5)
    assert "did not finish within 0.5 s" in str(err.value)
    assert ct.attach(["echo", "still fine"]) == (0, "still fine\n")


def test_lxc_missing(
    lxcpath: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, new_name: NewName
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no lxc-* tools on it
    with pytest.raises(LxcUnavailableError, match="LXC is not installed") as err:
        Container(new_name("nolxc"), lxcpath).create()
    assert "apt-get install lxc" in str(err.value)


def test_not_root(lxcpath: Path) -> None:
    """A real unprivileged process (a child that drops to nobody) gets the root error."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery from here on
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                list_containers(lxcpath)
                message = "no error"
            except LxcUnavailableError as exc:
                message = str(exc)
            os.write(write_fd, message.encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    assert "need root" in message and "sudo" in message
