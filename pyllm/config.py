"""Engine configuration: validated plain Python, from arguments or the environment.

Nothing here touches native code: a config is checked completely before a model is loaded.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from pyllm.errors import ConfigError
from pyllm.kvtypes import KV_CACHE_TYPES, normalize_kv_cache_type

FLASH_ATTN_VALUES = ("auto", "on", "off")
DEFAULT_N_BATCH = 2048
DEFAULT_N_UBATCH = 512
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _accepted_kv() -> str:
    return ", ".join(KV_CACHE_TYPES)


def _check_int(name: str, value: Any, *, minimum: int, maximum: Optional[int] = None, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}={value!r} is not an integer; expected an integer >= {minimum}{what}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ConfigError(f"{name}={value!r} is out of range; expected an integer {bound}{what}")
    return value


@dataclass
class EngineConfig:
    """What the engine loads and how: one field per llama.cpp knob a user sets.

    ``kv_cache_type_k`` / ``kv_cache_type_v``: the data type of the attention K and V caches
    (one of ``f32 f16 bf16 q8_0 q4_0 q4_1 iq4_nl q5_0 q5_1``); ``None`` keeps llama.cpp's
    default (f16). A quantized V cache needs flash attention (``flash_attn`` ``auto`` or ``on``).
    """

    model_path: Optional[str] = None          # None: the default model (see pyllm.default_model)
    chat_template: Optional[str] = None       # None: the model's own template
    n_ctx: int = 4096                         # max context length (tokens); 0 = the model's training context
    n_batch: Optional[int] = None             # logical batch, max tokens per llama_decode (None: min(2048, n_ctx))
    n_ubatch: Optional[int] = None            # physical batch (None: min(512, n_batch))
    n_gpu_layers: int = 0                     # layers offloaded to the GPU (-ngl); -1 or >= n_layer = all
    use_mmap: bool = True
    use_mlock: bool = False
    n_threads: Optional[int] = None           # None: llama.cpp's default (physical cores, up to 4+)
    n_threads_batch: Optional[int] = None
    flash_attn: str = "auto"                  # auto | on | off (-fa)
    kv_cache_type_k: Optional[str] = None     # -ctk
    kv_cache_type_v: Optional[str] = None     # -ctv
    seed: Optional[int] = None                # None: llama.cpp's default (random)
    offload_kqv: bool = True                  # keep the KV cache and attention on the GPU when offloading

    def __post_init__(self) -> None:
        if self.model_path is not None:
            if not isinstance(self.model_path, (str, os.PathLike)) or not str(self.model_path).strip():
                raise ConfigError(f"model_path={self.model_path!r} is not a path; expected a GGUF file path or None")
            self.model_path = os.fspath(self.model_path)
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise ConfigError(f"chat_template={self.chat_template!r} is not a string; expected a template name, a .jinja path or template text")
        _check_int("n_ctx", self.n_ctx, minimum=0, maximum=2**31 - 1, what=" (0 = the model's training context)")
        if self.n_batch is None:
            self.n_batch = min(DEFAULT_N_BATCH, self.n_ctx) if self.n_ctx else DEFAULT_N_BATCH
        _check_int("n_batch", self.n_batch, minimum=1, maximum=2**31 - 1)
        if self.n_ubatch is None:
            self.n_ubatch = min(DEFAULT_N_UBATCH, self.n_batch)
        _check_int("n_ubatch", self.n_ubatch, minimum=1, maximum=2**31 - 1)
        if self.n_ubatch > self.n_batch:
            raise ConfigError(f"n_ubatch={self.n_ubatch} is larger than n_batch={self.n_batch}; expected n_ubatch <= n_batch")
        if self.n_ctx and self.n_batch > self.n_ctx:
            # llama.cpp would clamp silently; say so instead of pretending the batch is that large.
            raise ConfigError(f"n_batch={self.n_batch} is larger than n_ctx={self.n_ctx}; expected n_batch <= n_ctx")
        _check_int("n_gpu_layers", self.n_gpu_layers, minimum=-1, what=" (-1 = all layers)")
        for name in ("use_mmap", "use_mlock", "offload_kqv"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} is not a bool; expected True or False")
        for name in ("n_threads", "n_threads_batch"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1, maximum=1024, what=" or None for llama.cpp's default")
        fa = self.flash_attn.strip().lower() if isinstance(self.flash_attn, str) else self.flash_attn
        if fa not in FLASH_ATTN_VALUES:
            raise ConfigError(f"flash_attn={self.flash_attn!r} is not valid; expected one of: {', '.join(FLASH_ATTN_VALUES)}")
        self.flash_attn = fa
        for name in ("kv_cache_type_k", "kv_cache_type_v"):
            value = getattr(self, name)
            if value is None:
                continue
            canon = normalize_kv_cache_type(value)
            if canon is None:
                raise ConfigError(f"{name}={value!r} is not a KV cache type; expected one of: {_accepted_kv()}")
            setattr(self, name, canon)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0, maximum=2**32 - 1)
        v = self.kv_cache_type_v
        if self.flash_attn == "off" and v is not None and v not in ("f32", "f16", "bf16"):
            raise ConfigError(
                f"kv_cache_type_v={v!r} needs flash attention, but flash_attn='off'; "
                "use flash_attn='on' or 'auto', or an unquantized V type (f16, bf16, f32)"
            )

    @property
    def effective_type_k(self) -> str:
        return self.kv_cache_type_k or "f16"

    @property
    def effective_type_v(self) -> str:
        return self.kv_cache_type_v or "f16"

    def replace(self, **changes: Any) -> "EngineConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None, **overrides: Any) -> "EngineConfig":
        """Build a config from environment variables; explicit keyword arguments win.

        Precedence for the KV types: argument > KV_CACHE_TYPE_K / KV_CACHE_TYPE_V > KV_CACHE_TYPE > f16.
        An invalid value raises ConfigError naming the variable; it never falls back to a default.
        """
        env = os.environ if env is None else env
        kw: dict[str, Any] = {}

        def text(var: str) -> Optional[str]:
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                return None
            return raw.strip()

        def integer(var: str, field_name: str, minimum: int) -> None:
            raw = text(var)
            if raw is None:
                return
            try:
                value = int(raw, 10)
            except ValueError:
                raise ConfigError(f"{var}={env[var]!r} is not an integer; expected an integer >= {minimum}") from None
            if value < minimum:
                raise ConfigError(f"{var}={env[var]!r} is out of range; expected an integer >= {minimum}")
            kw[field_name] = value

        def boolean(var: str, field_name: str) -> None:
            raw = text(var)
            if raw is None:
                return
            low = raw.lower()
            if low not in _TRUE | _FALSE:
                raise ConfigError(f"{var}={env[var]!r} is not a boolean; expected one of: 1, 0, true, false, yes, no, on, off")
            kw[field_name] = low in _TRUE

        def kv_type(var: str) -> Optional[str]:
            raw = text(var)
            if raw is None:
                return None
            canon = normalize_kv_cache_type(raw)
            if canon is None:
                raise ConfigError(f"{var}={env[var]!r} is not a KV cache type; expected one of: {_accepted_kv()}")
            return canon

        if (path := text("MODEL_PATH")) is not None:
            kw["model_path"] = path
        if (tmpl := env.get("MODEL_CHAT_TEMPLATE")) is not None and tmpl.strip():
            kw["chat_template"] = tmpl
        integer("MAX_CONTEXT_LENGTH", "n_ctx", 0)
        integer("LLAMA_BATCH_SIZE", "n_batch", 1)
        integer("LLAMA_UBATCH_SIZE", "n_ubatch", 1)
        integer("GPU_LAYERS", "n_gpu_layers", -1)
        integer("LLAMA_THREADS", "n_threads", 1)
        integer("LLAMA_SEED", "seed", 0)
        boolean("USE_MLOCK", "use_mlock")
        boolean("USE_MMAP", "use_mmap")
        if (fa := text("FLASH_ATTN")) is not None:
            if fa.lower() not in FLASH_ATTN_VALUES:
                raise ConfigError(f"FLASH_ATTN={env['FLASH_ATTN']!r} is not valid; expected one of: {', '.join(FLASH_ATTN_VALUES)}")
            kw["flash_attn"] = fa.lower()
        both = kv_type("KV_CACHE_TYPE")
        k = kv_type("KV_CACHE_TYPE_K")
        v = kv_type("KV_CACHE_TYPE_V")
        if k or both:
            kw["kv_cache_type_k"] = k or both
        if v or both:
            kw["kv_cache_type_v"] = v or both
        kw.update(overrides)
        if "n_threads" in kw and "n_threads_batch" not in kw:
            kw["n_threads_batch"] = kw["n_threads"]
        try:
            return cls(**kw)
        except TypeError as exc:
            raise ConfigError(f"invalid EngineConfig argument: {exc}") from None


ENV_VARS: dict[str, str] = {
    "MODEL_PATH": "GGUF model file (default: the Gemma 3 270M Q4_K_M default model)",
    "MODEL_CHAT_TEMPLATE": "chat template for chat/--chat: a name (glm4, a shipped template, a llama.cpp built-in), "
                           "a .jinja path or template text (default: the GGUF's tokenizer.chat_template)",
    "MAX_CONTEXT_LENGTH": "n_ctx, the context length in tokens (default 4096; 0 = model's training context)",
    "LLAMA_BATCH_SIZE": "n_batch, max tokens per llama_decode call (default 2048)",
    "LLAMA_UBATCH_SIZE": "n_ubatch, physical batch (default 512)",
    "GPU_LAYERS": "n_gpu_layers, layers offloaded to the GPU (-1 or 99 = all; default 0)",
    "LLAMA_THREADS": "n_threads and n_threads_batch (default: llama.cpp's)",
    "LLAMA_SEED": "sampling seed (default: random)",
    "USE_MLOCK": "lock the model in RAM (1/0)",
    "USE_MMAP": "memory-map the model file (1/0, default 1)",
    "FLASH_ATTN": "auto | on | off (default auto: on when V is quantized)",
    "KV_CACHE_TYPE": "K and V cache type: f32 f16 bf16 q8_0 q4_0 q4_1 iq4_nl q5_0 q5_1",
    "KV_CACHE_TYPE_K": "K cache type (overrides KV_CACHE_TYPE for K)",
    "KV_CACHE_TYPE_V": "V cache type (overrides KV_CACHE_TYPE for V)",
}
