"""Guest-image loaders: flat binaries, ELF32/ELF64 executables and multiboot v1 kernels.

>>> image = load_image("guest.elf", ram_size=64 << 20)
>>> image.kind, image.mode, hex(image.entry)
('elf64', <Mode.LONG: 'long'>, '0x100000')
>>> place(image, vm)                       # segments written, BSS zeroed
>>> ebx = build_multiboot_info(vm, image, ram_size=64 << 20, cmdline="guest.elf")

Every fault of an image (or a module) is an :class:`~kvmkit.runner.errors.ImageError`
whose ``str()`` is ``"FILE: fault"``.
"""

from kvmkit.runner.loaders.image import LoadedImage, MultibootHeader, Segment
from kvmkit.runner.loaders.load import load_image, place
from kvmkit.runner.loaders.mbinfo import (
    Module,
    MultibootPlan,
    build_multiboot_info,
    plan_multiboot_info,
)
from kvmkit.runner.loaders.multiboot import MULTIBOOT_BOOTLOADER_MAGIC, MULTIBOOT_HEADER_MAGIC

__all__ = [
    "load_image",
    "place",
    "build_multiboot_info",
    "plan_multiboot_info",
    "MultibootPlan",
    "LoadedImage",
    "Segment",
    "MultibootHeader",
    "Module",
    "MULTIBOOT_BOOTLOADER_MAGIC",
    "MULTIBOOT_HEADER_MAGIC",
]
