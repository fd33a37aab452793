"""KV cache data types: the user-facing names llama.cpp accepts for -ctk / -ctv.

Values are ggml_type numbers read from the compiled library, never retyped.
"""
from __future__ import annotations

from typing import Optional

from pyllm._ffi import ffi, lib

# Exactly the types llama.cpp's common/arg.cpp accepts for --cache-type-k/-v at this pin.
KV_CACHE_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
DEFAULT_KV_CACHE_TYPE = "f16"

_BY_NAME: dict[str, int] = {name: int(getattr(lib, f"GGML_TYPE_{name.upper()}")) for name in KV_CACHE_TYPES}
_UNQUANTIZED = {"f32", "f16", "bf16"}


def parse_kv_cache_type(name: object) -> Optional[int]:
    """Map a KV cache type name (case-insensitive, whitespace ignored) to its ggml_type; None if not one."""
    if not isinstance(name, str):
        return None
    return _BY_NAME.get(name.strip().lower())


def normalize_kv_cache_type(name: str) -> Optional[str]:
    """The canonical lower-case name of a KV cache type, or None if it is not one."""
    key = name.strip().lower() if isinstance(name, str) else None
    return key if key in _BY_NAME else None


def type_name(ggml_type: int) -> str:
    """ggml's own name of a type (ggml_type_name)."""
    return ffi.string(lib.ggml_type_name(ggml_type)).decode()


def block_size(ggml_type: int) -> int:
    """Values per block (ggml_blck_size): 32 for q8_0/q4_0, 1 for f16."""
    return int(lib.ggml_blck_size(ggml_type))


def type_size(ggml_type: int) -> int:
    """Bytes per block (ggml_type_size): 34 for q8_0, 18 for q4_0, 2 for f16."""
    return int(lib.ggml_type_size(ggml_type))


def is_quantized(name: str) -> bool:
    """True for a block-quantized KV type (needs flash attention when used for V)."""
    key = normalize_kv_cache_type(name)
    if key is None:
        raise ValueError(f"unknown KV cache type {name!r}; accepted: {', '.join(KV_CACHE_TYPES)}")
    return key not in _UNQUANTIZED


def bytes_per_value(name: str) -> float:
    t = _BY_NAME[normalize_kv_cache_type(name) or name]
    return type_size(t) / block_size(t)
