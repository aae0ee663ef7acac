"""The one size parser: every option that takes a size goes through :func:`parse_size`.

Spellings accepted: ``512M``, ``1G``, ``1.5G``, ``64MiB``, ``4096K``, ``2T``, and a bare
number, which is read in ``default_unit`` (bytes for ``kvmkit run --mem``, MiB for the
``kvmkit vm`` options, as virsh reads them).  Anything else — negative, NaN, infinite,
fractions of a byte, absurdly large — is a :class:`SizeError` with one line saying what
was wrong and how to spell it.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable

from kvmkit.errors import KvmkitError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

UNITS = {"": 1, "B": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}
#: No size option anywhere in kvmkit needs more than this (64 PiB).
MAX_SIZE = 1 << 56

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


class SizeError(KvmkitError, ValueError):
    """A size that cannot be read."""

    exit_status = 2


def parse_size(text: str | int, default_unit: str = "B", *, minimum: int = 0) -> int:
    """Bytes meant by ``text``; a bare number is in ``default_unit`` (``B``, ``K``, ``M``,
    ``G`` or ``T``).  Raises :class:`SizeError` for anything that is not a finite,
    non-negative, whole number of bytes of at least ``minimum``."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text * UNITS[default_unit.upper()]
        if not 0 <= value <= MAX_SIZE:
            raise SizeError(f"size {text} is out of range")
        return value
    match = _SIZE_RE.match(str(text))
    if match is None:
        raise SizeError(
            f"not a size: {text!r} (write a number with an optional unit: 512M, 1G, 1.5G)"
        )
    number, unit = match.group(1), match.group(2).upper() or default_unit.upper()
    amount = float(number) * UNITS[unit]
    if not math.isfinite(amount) or amount > MAX_SIZE:
        raise SizeError(f"size {text!r} is too large (at most {MAX_SIZE >> 50} PiB)")
    if amount != int(amount):
        raise SizeError(f"size {text!r} is not a whole number of bytes")
    value = int(amount)
    if value < minimum:
        raise SizeError(f"size {text!r} is too small: give at least {format_size(minimum)}")
    return value


def size_arg(default_unit: str = "B", *, minimum: int = 0) -> Callable[[str], int]:
    """An ``argparse`` ``type=`` for size options (errors become argparse's usage line)."""

    def convert(text: str) -> int:
        try:
            return parse_size(text, default_unit, minimum=minimum)
        except SizeError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = "size"
    return convert


def format_size(n: int) -> str:
    """``n`` bytes in the largest unit that keeps it whole: ``64M``, ``1536K``, ``3G``."""
    for suffix, unit in (("T", TiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return f"{n}"
