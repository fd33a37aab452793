"""The one import point of pyllm's compiled cffi module.

``from pyllm._ffi import ffi, lib`` is the documented escape hatch for low-level users:
``lib`` holds every declared function, struct and enum constant of llama.h (see cdef/),
checked by the C compiler against the vendored headers when the package was built.
"""
from __future__ import annotations

from pathlib import Path

try:
    from pyllm._ffi._native import ffi, lib
except ImportError as exc:  # pragma: no cover - only on a broken or missing build
    raise ImportError(
        "pyllm's compiled extension (pyllm._ffi._native) could not be imported: "
        f"{exc}. Build and install the package with `python3 vendor/fetch.py && pip install .` "
        "(importing pyllm from a source checkout without installing it does not work)."
    ) from exc


def _source_version() -> str:
    from pyllm.version import VERSION

    return VERSION


def _check_build_identity() -> None:
    built = ffi.string(lib.pyllm_build_version()).decode()
    expected = _source_version()
    if built != expected:
        raise ImportError(
            f"pyllm version mismatch: the compiled extension was built as {built!r} but the Python "
            f"package is {expected!r}; rebuild with `pip install .` ({Path(__file__).parent})"
        )


_check_build_identity()

__all__ = ["ffi", "lib"]
