"""cffi build script for ``kvmkit._kvm``.

It only glues files together: the cdef is ``csrc/kvm_cdef.h`` (plus the fast path's
``csrc/fastpath.h``), the C sources are ``csrc/*.c``.  API mode, so the compiler checks
every declaration against ``<linux/kvm.h>``.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
CDEF_FILES = ["kvm_cdef.h", "fastpath.h"]
C_FILES = ["kvm_helpers.c", "fastpath.c"]


def _read_existing(names: list[str]) -> str:
    return "\n".join((HERE / n).read_text() for n in names if (HERE / n).exists())


ffibuilder = FFI()
ffibuilder.cdef(_read_existing(CDEF_FILES))
ffibuilder.set_source(
    "kvmkit._kvm",
    _read_existing(C_FILES),
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parent / "build"), verbose=True)
