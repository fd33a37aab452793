"""The one import point of pyllm's compiled cffi module.

``from pyllm._ffi import ffi, lib`` is the documented escape hatch for low-level users:
``lib`` holds every declared function, struct and enum constant of llama.h (see cdef/),
checked by the C compiler against the vendored headers when the package was built.
"""
from __future__ import annotations

from pathlib import Path

def _missing_extension(exc: ImportError) -> str:
    """Why the compiled module is missing, and what to do: a source checkout that shadows the installed
    package (Python puts the current directory first) is the common case, and installing again would not help."""
    package = Path(__file__).resolve().parents[1]
    if any((d / "vendor" / "fetch.py").is_file() for d in (package.parent, package.parent.parent)):
        try:
            from importlib.metadata import PackageNotFoundError, version

            installed = version("pyllm")
        except PackageNotFoundError:
            installed = None
        if installed is not None:
            return (f"pyllm was imported from the source checkout {package}, which has no compiled module, instead "
                    f"of the installed pyllm {installed}: the checkout's root is on sys.path (the current directory, "
                    "or `python -m` run there). Run from another directory, or install the checkout in editable "
                    "mode: `pip install --no-build-isolation -Ceditable.rebuild=false -e .` (README: Set-up).")
    return (f"pyllm's compiled extension (pyllm._ffi._native) could not be imported: {exc}. Build and install the "
            "package with `python3 vendor/fetch.py && pip install .` (importing pyllm from a source checkout "
            "without installing it does not work).")


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
    raise ImportError(_missing_extension(exc)) from exc


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
