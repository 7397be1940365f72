"""cffi builder for rtpproxy._relay (API mode).

relay.h is both the C header and the cdef: what Python may call is exactly what
the header declares.
"""
import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
HEADER = (HERE / "relay.h").read_text()


def _rel(p: Path) -> str:
    # setuptools refuses absolute source paths; the build runs from the project root.
    return os.path.relpath(p)

ffibuilder = FFI()
ffibuilder.cdef(HEADER)
ffibuilder.set_source(
    "rtpproxy._relay",
    '#include <stdint.h>\n#include "relay.h"\n',
    sources=[_rel(HERE / "engine.c")],
    include_dirs=[_rel(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
