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
    if "libcudart" in str(exc) or "libcublas" in str(exc):
        raise ImportError(
            f"pyllm's CUDA build could not load the CUDA runtime: {exc}. The wheel links the toolkit's "
            "libcudart and libcublas dynamically: put their folder on the loader's path, e.g. "
            "`export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$LD_LIBRARY_PATH` (or the lib folder of the "
            "nvidia-cuda-runtime / nvidia-cublas wheels), then import again."
        ) from exc
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
