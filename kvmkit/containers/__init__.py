"""LXC containers beside kvmkit's VMs: :class:`Container` mirrors the ``lxc-*`` verbs
(create, start, attach, console, info, stop, destroy; :func:`list_containers` is lxc-ls).
See :mod:`kvmkit.containers.lxc` for why it drives the tools rather than LXC's binding."""

from kvmkit.containers.errors import (
    ContainerError,
    ContainerExistsError,
    ContainerOutputError,
    ContainerStateError,
    InvalidNameError,
    LxcCommandError,
    LxcUnavailableError,
    NoSuchContainerError,
    TemplateNotFoundError,
)
from kvmkit.containers.lxc import (
    NETWORKS,
    Container,
    ContainerInfo,
    check_lxc,
    default_lxcpath,
    list_containers,
)

__all__ = [
    "Container",
    "ContainerInfo",
    "list_containers",
    "default_lxcpath",
    "check_lxc",
    "NETWORKS",
    "ContainerError",
    "LxcUnavailableError",
    "InvalidNameError",
    "ContainerExistsError",
    "NoSuchContainerError",
    "TemplateNotFoundError",
    "ContainerStateError",
    "ContainerOutputError",
    "LxcCommandError",
]
