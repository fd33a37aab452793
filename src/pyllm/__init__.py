"""pyllm: a Python binding of a pinned llama.cpp, built around KV-cache quantization.

The usual entry points::

    from pyllm import Engine, EngineConfig
    with Engine(EngineConfig(kv_cache_type_k="q8_0", kv_cache_type_v="q8_0")) as engine:
        print(engine.generate("Hello", max_tokens=32).text)

Lower level: ``pyllm.Model``, ``pyllm.Context``, ``pyllm.Sampler``; the raw C API is
``from pyllm._ffi import ffi, lib``.
"""
from pyllm.buildinfo import build_info
from pyllm.config import EngineConfig
from pyllm.context import Context, KVCacheBytes
from pyllm.engine import Engine, GenerationResult
from pyllm.kvtypes import KV_CACHE_TYPES, parse_kv_cache_type
from pyllm.model import Model
from pyllm.sampling import Sampler, SamplingParams
from pyllm.version import VERSION

__version__ = VERSION
__all__ = [
    "Context", "Engine", "EngineConfig", "GenerationResult", "KVCacheBytes", "KV_CACHE_TYPES", "Model", "Sampler",
    "SamplingParams", "VERSION", "build_info", "parse_kv_cache_type",
]
