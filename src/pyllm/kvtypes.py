"""KV cache data types: the user-facing names llama.cpp accepts for -ctk / -ctv.

The names are plain Python (config validation needs no compiled code); every fact about a type
(its ggml_type number, block size, bytes per block, whether it is quantized) is read from the
compiled library when first asked for, never retyped.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

# Exactly the types llama.cpp's common/arg.cpp accepts for --cache-type-k/-v at this pin.
KV_CACHE_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
DEFAULT_KV_CACHE_TYPE = "f16"


def normalize_kv_cache_type(name: object) -> Optional[str]:
    """The canonical lower-case name of a KV cache type (whitespace ignored), or None if it is not one."""
    key = name.strip().lower() if isinstance(name, str) else None
    return key if key in KV_CACHE_TYPES else None


def _lib():
    from pyllm._ffi import lib

    return lib


@lru_cache(maxsize=None)
def _ggml_type(name: str) -> int:
    return int(getattr(_lib(), f"GGML_TYPE_{name.upper()}"))


def parse_kv_cache_type(name: object) -> Optional[int]:
    """Map a KV cache type name (case-insensitive, whitespace ignored) to its ggml_type; None if not one."""
    key = normalize_kv_cache_type(name)
    return None if key is None else _ggml_type(key)


def type_name(ggml_type: int) -> str:
    """ggml's own name of a type (ggml_type_name)."""
    from pyllm._ffi import ffi

    return ffi.string(_lib().ggml_type_name(ggml_type)).decode()


def block_size(ggml_type: int) -> int:
    """Values per block (ggml_blck_size): 32 for q8_0/q4_0, 1 for f16."""
    return int(_lib().ggml_blck_size(ggml_type))


def type_size(ggml_type: int) -> int:
    """Bytes per block (ggml_type_size): 34 for q8_0, 18 for q4_0, 2 for f16."""
    return int(_lib().ggml_type_size(ggml_type))


@lru_cache(maxsize=None)
def is_quantized(name: str) -> bool:
    """True for a block-quantized KV type (ggml_is_quantized); such a V cache needs flash attention."""
    key = normalize_kv_cache_type(name)
    if key is None:
        raise ValueError(f"unknown KV cache type {name!r}; accepted: {', '.join(KV_CACHE_TYPES)}")
    return bool(_lib().ggml_is_quantized(_ggml_type(key)))


def unquantized_types() -> tuple[str, ...]:
    """The KV types a V cache may use without flash attention (f32, f16, bf16 at this pin)."""
    return tuple(t for t in KV_CACHE_TYPES if not is_quantized(t))


def bytes_per_value(name: str) -> float:
    t = _ggml_type(normalize_kv_cache_type(name) or name)
    return type_size(t) / block_size(t)
