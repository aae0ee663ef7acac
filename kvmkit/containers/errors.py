"""Errors of :mod:`kvmkit.containers`; each says what went wrong and what to do::

KvmkitError
 └── ContainerError                 kvmkit.containers
      ├── LxcUnavailableError       the lxc-* tools are missing, or not running as root
      ├── InvalidNameError          a name LXC (or a veth/cgroup name) cannot carry
      ├── ContainerExistsError      create: the name is taken in this lxcpath
      ├── NoSuchContainerError      a verb on a name that is not defined
      ├── TemplateNotFoundError     create: no such LXC template
      ├── ContainerStateError       start a running one, attach to a stopped one, ...
      ├── ContainerOutputError      attach: the command printed more than the limit
      └── LxcCommandError           an lxc-* tool failed or timed out (its own message kept)
"""

from __future__ import annotations

from collections.abc import Sequence

from kvmkit.errors import KvmkitError


class ContainerError(KvmkitError):
    """Something about an LXC container went wrong."""


class LxcUnavailableError(ContainerError):
    """The ``lxc-*`` tools are not installed, or this process is not root."""


class InvalidNameError(ContainerError):
    """A container name that LXC, a cgroup or a veth name cannot carry."""


class ContainerExistsError(ContainerError):
    """``create`` on a name already defined in this lxcpath."""


class NoSuchContainerError(ContainerError):
    """A verb on a container that is not defined in this lxcpath."""


class TemplateNotFoundError(ContainerError):
    """``create`` with a template LXC does not have."""


class ContainerStateError(ContainerError):
    """The container is not in a state the verb works in (e.g. attach to a stopped one)."""


class ContainerOutputError(ContainerError):
    """A command inside the container printed more than the caller's limit."""


class LxcCommandError(ContainerError):
    """An ``lxc-*`` tool failed or timed out; ``argv``, ``status`` and LXC's own message
    (the last lines it wrote to stderr) are kept."""

    def __init__(
        self, argv: Sequence[str], status: int | None, stderr: str, *, hint: str | None = None
    ) -> None:
        self.argv = list(argv)
        self.status = status
        self.stderr = stderr
        what = "timed out" if status is None else f"exited with status {status}"
        detail = " | ".join(line.strip() for line in stderr.strip().splitlines()[-3:])
        message = f"{self.argv[0]} {what}"
        if detail:
            message += f": {detail}"
        super().__init__(message, hint=hint)
