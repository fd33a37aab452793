"""Generate the C source of pyllm's cffi extension (out-of-line API mode).

Run by CMake at build time (see CMakeLists.txt), never at import:

    python build.py OUTPUT.c

The declarations are ours, one fragment per area of llama.h in cdef/, loaded in the
order of their numeric prefixes, then the glue's own declarations, taken from the marked
block of pyllm_glue.h (the same header the C glue is compiled against, so they cannot drift). The C compiler then checks every declared signature
against the real headers, fills in enum values and partial struct layouts (``...``),
and cffi verifies the exact structs' layouts when the module is imported.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent
CDEF_DIR = HERE / "cdef"
MODULE_NAME = "pyllm._ffi._native"
SOURCE = '#include "pyllm_glue.h"\n'


def cdef_fragments() -> list[Path]:
    """The fragments in their explicit load order (numeric prefix: ggml types first, glue last)."""
    return sorted(CDEF_DIR.glob("[0-9][0-9]_*.h"))


GLUE_HEADER = HERE / "pyllm_glue.h"
_GLUE_BLOCK = re.compile(r"/\* cffi-cdef-begin.*?\*/(.*?)/\* cffi-cdef-end \*/", re.S)


def glue_declarations() -> str:
    m = _GLUE_BLOCK.search(GLUE_HEADER.read_text())
    if not m:
        raise SystemExit(f"{GLUE_HEADER.name}: no cffi-cdef-begin ... cffi-cdef-end block")
    return m.group(1)


def make_builder() -> cffi.FFI:
    ffibuilder = cffi.FFI()
    sources = [(f.name, f.read_text()) for f in cdef_fragments()] + [(GLUE_HEADER.name, glue_declarations())]
    for name, text in sources:
        try:
            ffibuilder.cdef(text, override=False)
        except cffi.CDefError as exc:
            raise SystemExit(f"{name}: {exc}") from exc
    ffibuilder.set_source(MODULE_NAME, SOURCE)
    return ffibuilder


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} OUTPUT.c", file=sys.stderr)
        return 2
    out = Path(argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    make_builder().emit_c_code(str(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
