"""Configuration: one validated parameter object, the rules it obeys, and where its values come from.

Every setting a user can give (a keyword argument, a command-line flag, an environment variable or
a line of a ``.env`` file) is described once in :data:`SETTINGS` and parsed by one function per
kind, so a bad value gets the same words wherever it came from, naming its source (the flag, the
variable and the file it was read from). The rules that involve several settings (a quantized V
cache needs flash attention, n_ubatch <= n_batch <= n_ctx) are written once here and used by the
engine, ``bench``, ``plan`` and ``kv-eval`` alike. Model-dependent rules (MLA, head sizes) live in
:func:`pyllm.context.validate_kv_types`, the one place that sees the model.

Nothing here imports compiled code at import time; the one native fact used (whether a type is
quantized) is read from ggml when a rule needs it.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from pyllm.errors import ConfigError, KVCacheConfigError
from pyllm.kvtypes import DEFAULT_KV_CACHE_TYPE, KV_CACHE_TYPES, is_quantized, normalize_kv_cache_type, unquantized_types

FLASH_ATTN_VALUES = ("auto", "on", "off")
# KV_CACHE_TYPE=auto / -ctk auto / -ctv auto: the highest-fidelity K/V pair whose context fits the free memory,
# chosen with pyllm plan's measurements before the model loads (pyllm.plan.choose_kv_types).
KV_AUTO = "auto"
# --cache-ram / LLAMA_ARG_CACHE_RAM (llama-server's flag and variable): MiB of host memory for cached prompt
# states; -1 no limit, 0 off. llama-server's default is 8192; pyllm's is that, capped at a quarter of the
# machine's physical memory (6144 MiB on a 24 GiB machine), so the cache never crowds out weights and KV cache.
LLAMA_SERVER_CACHE_RAM_MIB = 8192
SPLIT_MODES = ("none", "layer", "row")
DEFAULT_N_CTX = 4096
DEFAULT_N_BATCH = 2048
DEFAULT_N_UBATCH = 512
# llama.cpp sizes a context in blocks of 256 cells (GGML_PAD(n_ctx, 256) in llama_context): a smaller
# n_ctx silently becomes 256, a larger one is rounded up to a multiple of 256.
N_CTX_PAD = 256
MIN_N_CTX = N_CTX_PAD
INT32_MAX = 2**31 - 1
# A chat reply's default bound (Engine.chat / stream_chat, pyllm chat without -n): at most this many
# tokens, and never more than the context has room for after the prompt (as the server caps max_tokens).
CHAT_MAX_TOKENS = 512
ENV_FILE_VAR = "PYLLM_ENV_FILE"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


# ---- the rules: one function, one wording, one exception class each ----
def check_int(source: str, value: Any, *, minimum: int, maximum: int = INT32_MAX, what: str = "",
              text: bool = False) -> int:
    """An integer in [minimum, maximum]; ConfigError naming ``source`` and the value as given otherwise.
    ``text``: the value may be decimal text (a variable, a flag)."""
    given = value
    if text and isinstance(value, str):
        try:
            value = int(value.strip(), 10)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{source}={given!r} is not an integer; expected an integer in [{minimum}, {maximum}]{what}")
    if not minimum <= value <= maximum:
        raise ConfigError(f"{source}={given!r} is out of range; expected an integer in [{minimum}, {maximum}]{what}")
    return value


def check_bool(source: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    low = value.strip().lower() if isinstance(value, str) else None
    if low in _TRUE or low in _FALSE:
        return low in _TRUE
    raise ConfigError(f"{source}={value!r} is not a boolean; expected one of: {', '.join(_TRUE + _FALSE)}")


def check_seconds(source: str, value: Any, *, maximum: float, allow_zero: bool = False) -> float:
    """A number of seconds (a number or its decimal text) in (0, maximum], or [0, maximum] with ``allow_zero``."""
    given = value
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            pass
    lower = "0" if allow_zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value == value:
        raise ConfigError(f"{source}={given!r} is not a number of seconds; expected a number {lower}")
    if not (0 <= value if allow_zero else 0 < value) or value > maximum:
        interval = f"[0, {maximum:g}]" if allow_zero else f"(0, {maximum:g}]"
        raise ConfigError(f"{source}={given!r} is out of range; expected seconds in {interval}")
    return float(value)


def check_kv_type(source: str, value: Any, *, allow_auto: bool = False) -> str:
    """The canonical name of a KV cache type (or ``auto`` where ``allow_auto``: a setting an engine resolves
    before it loads); KVCacheConfigError naming ``source`` otherwise."""
    canon = normalize_kv_cache_type(value)
    if canon is None:
        is_auto = isinstance(value, str) and value.strip().lower() == KV_AUTO
        if is_auto and allow_auto:
            return KV_AUTO
        if is_auto:
            raise KVCacheConfigError(
                f"{source}={value!r}: auto chooses one K/V pair before an engine loads (generate, chat, serve, or "
                f"pyllm.plan.resolve_kv_auto; alone on a side of plan, bench or kv-eval it lists the pairs auto "
                f"tries); here a concrete type is needed, one of: {', '.join(KV_CACHE_TYPES)}")
        raise KVCacheConfigError(f"{source}={value!r} is not a KV cache type; expected one of: "
                                 f"{', '.join(KV_CACHE_TYPES)}" + (" or auto" if allow_auto else ""))
    return canon


def physical_memory_bytes() -> Optional[int]:
    """This machine's physical memory (sysconf's pages x page size), None where the system does not say."""
    try:
        n = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return n if n > 0 else None


def default_cache_ram_mib(physical: Optional[int] = None) -> int:
    """--cache-ram's default: llama-server's 8192 MiB, at most a quarter of physical memory (6144 on 24 GiB)."""
    physical = physical_memory_bytes() if physical is None else physical
    if physical is None:
        return LLAMA_SERVER_CACHE_RAM_MIB
    return max(1, min(LLAMA_SERVER_CACHE_RAM_MIB, physical // 4 // 2**20))


def check_cache_ram(source: str, value: Any, *, physical: Optional[int] = None) -> int:
    """--cache-ram in MiB: -1 (no limit), 0 (off), or up to the machine's physical memory."""
    value = check_int(source, value, minimum=-1, what=" MiB (-1 = no limit, 0 = off)", text=True)
    physical = physical_memory_bytes() if physical is None else physical
    if physical is not None and value > physical // 2**20:
        raise ConfigError(f"{source}={value} MiB is more than this machine's physical memory "
                          f"({physical // 2**20:,} MiB); expected -1 (no limit), 0 (off) or at most "
                          f"{physical // 2**20} MiB (default {default_cache_ram_mib(physical)})")
    return value


def check_directory(source: str, value: Any) -> str:
    """An existing directory (llama-server's --slot-save-path refuses anything else: 'not a directory')."""
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ConfigError(f"{source}={value!r} is not a path; expected an existing directory")
    path = os.fspath(value)
    if not os.path.isdir(path):
        what = "does not exist" if not os.path.exists(path) else "is not a directory"
        raise ConfigError(f"{source}={path!r} {what}; expected an existing directory (create it first)")
    return path


def check_flash_attn(source: str, value: Any) -> str:
    low = value.strip().lower() if isinstance(value, str) else None
    if low not in FLASH_ATTN_VALUES:
        raise ConfigError(f"{source}={value!r} is not valid; expected one of: {', '.join(FLASH_ATTN_VALUES)}")
    return low


def check_split_mode(source: str, value: Any) -> str:
    low = value.strip().lower() if isinstance(value, str) else None
    if low not in SPLIT_MODES:
        raise ConfigError(f"{source}={value!r} is not a split mode; expected one of: {', '.join(SPLIT_MODES)}")
    return low


def check_tensor_split(source: str, value: Any) -> Optional[tuple[float, ...]]:
    """``3,1`` (or a sequence of numbers): each device's share of the layers, non-negative, not all zero.
    Its length is checked against the model's devices when the model loads (pyllm.model)."""
    if value is None:
        return None
    items = value.replace("/", ",").split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ConfigError(f"{source}={value!r} is not a list of proportions; expected e.g. 3,1")
    out = []
    for item in items:
        num = item
        if isinstance(item, str):
            try:
                num = float(item.strip())
            except ValueError:
                num = None
        if isinstance(num, bool) or not isinstance(num, (int, float)) or not math.isfinite(num):
            raise ConfigError(f"{source}={value!r}: {item!r} is not a number; expected non-negative proportions, e.g. 3,1")
        if num < 0:
            raise ConfigError(f"{source}={value!r}: {item!r} is negative; expected non-negative proportions, e.g. 3,1")
        out.append(float(num))
    if not any(out):
        raise ConfigError(f"{source}={value!r} is all zeros; expected at least one device with a positive share")
    return tuple(out)


def check_v_needs_flash_attn(type_v: str, flash_attn: str) -> None:
    """llama.cpp refuses a quantized V cache without flash attention."""
    if flash_attn == "off" and type_v != KV_AUTO and is_quantized(type_v):
        raise KVCacheConfigError(
            f"quantized V cache ({type_v}) requires flash attention, but flash_attn is 'off'; "
            f"use -fa on or auto (FLASH_ATTN), or an unquantized V type ({', '.join(unquantized_types())})"
        )


def label(field: str, value: Any = None) -> str:
    """How a message names a setting wherever it came from: ``n_batch (-b, LLAMA_BATCH_SIZE)``, with a
    value ``n_batch=512 (-b, LLAMA_BATCH_SIZE)``."""
    s = SETTINGS_BY_FIELD.get(field)
    names = ([s.flags[0]] if s and s.flags else []) + ([s.env] if s and s.env else [])
    head = field if value is None else f"{field}={value}"
    return f"{head} ({', '.join(names)})" if names else head


def check_n_ctx(n_ctx: int) -> None:
    """0 (the model's training context) or at least MIN_N_CTX: llama.cpp would turn a smaller context into
    256 cells without a word."""
    check_int("n_ctx", n_ctx, minimum=0, what=" (0 = the model's training context)")
    if 0 < n_ctx < MIN_N_CTX:
        raise ConfigError(
            f"n_ctx={n_ctx} is below {MIN_N_CTX}, the smallest context llama.cpp creates (it allocates the KV "
            f"cache in blocks of {N_CTX_PAD} cells); expected {label('n_ctx')} >= {MIN_N_CTX}, or 0 for the "
            "model's training context")


def check_batch_sizes(n_ctx: int, n_batch: int, n_ubatch: int) -> None:
    check_int("n_batch", n_batch, minimum=1)
    check_int("n_ubatch", n_ubatch, minimum=1)
    if n_ubatch > n_batch:
        raise ConfigError(f"n_ubatch={n_ubatch} is larger than n_batch={n_batch}; expected "
                          f"{label('n_ubatch')} <= {label('n_batch')}")
    if n_ctx and n_batch > n_ctx:
        # llama.cpp would clamp silently; say so instead of pretending the batch is that large.
        raise ConfigError(f"n_batch={n_batch} is larger than n_ctx={n_ctx}; expected "
                          f"{label('n_batch')} <= {label('n_ctx')}")


def check_parallel(n_parallel: int, n_batch: int, n_ctx: int = 0, *, name: Optional[str] = None) -> None:
    """Sequences at once (n_seq_max) against the batch: llama.cpp reserves one output row per sequence in
    a buffer of n_batch rows and aborts the process (GGML_ASSERT n_outputs_max) when there are more.
    ``n_ctx``: the context as llama.cpp takes it before padding (the training context for 0), which caps
    n_batch. ``name``: how the message names n_parallel where a command calls it otherwise (bench's -npl)."""
    check_int(name or "n_parallel", n_parallel, minimum=1, maximum=256, what=" (llama.cpp's LLAMA_MAX_SEQ)")
    effective = min(n_batch, n_ctx) if n_ctx else n_batch
    if n_parallel > effective:
        capped = f" (n_batch={n_batch} capped by n_ctx={n_ctx})" if effective < n_batch else ""
        raise ConfigError(
            f"{name or 'n_parallel'}={n_parallel} is larger than n_batch={effective}{capped}; llama.cpp needs a batch "
            f"row for every sequence: expected {name or label('n_parallel')} <= {label('n_batch')}")


def check_threads(source: str, value: Any) -> Optional[int]:
    return None if value is None else check_int(source, value, minimum=1, maximum=1024, what=" or None for the default")


def kv_pairs(types_k: Sequence[str], types_v: Optional[Sequence[str]]) -> list[tuple[str, str]]:
    """The K/V pairs a list command runs, the same rule in bench, plan and kv-eval: without V types,
    each K type with itself (K = V); with them, every K x V pair (llama-bench's cross product)."""
    ks = [check_kv_type("-ctk", t) for t in types_k]
    vs = None if types_v is None else [check_kv_type("-ctv", t) for t in types_v]
    if not ks:
        raise KVCacheConfigError("-ctk is empty; expected at least one KV cache type")
    pairs = [(k, k) for k in ks] if not vs else [(k, v) for k in ks for v in vs]
    return list(dict.fromkeys(pairs))


# ---- where values come from: the environment, a .env file, flags ----
class Environment(Mapping[str, str]):
    """The process environment over an optional ``.env`` file: real variables win over the file's, and
    every value remembers where it came from (for error messages)."""

    def __init__(self, environ: Optional[Mapping[str, str]] = None, env_file: Optional[str] = None) -> None:
        environ = dict(os.environ if environ is None else environ)
        self.env_file = env_file if env_file is not None else (environ.get(ENV_FILE_VAR) or None)
        self._file_values = read_env_file(self.env_file) if self.env_file else {}
        self._values = {**self._file_values, **environ}

    def __getitem__(self, key: str) -> str:
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def source(self, var: str) -> str:
        """``VAR`` or ``VAR (from FILE)``: how an error names the origin of a value."""
        if var in self._file_values and self._values.get(var) == self._file_values[var]:
            return f"{var} (from {self.env_file})"
        return var


def read_env_file(path: str) -> dict[str, str]:
    """A ``.env`` file's variables, parsed by python-dotenv (``export``, quotes, inline ``# comments``)."""
    p = Path(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "no such file"
        raise ConfigError(f"env file {path}: {what}; expected a .env file of VAR=value lines")
    from dotenv import dotenv_values

    try:
        values = dotenv_values(p, interpolate=False)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"env file {path}: cannot be read ({exc})") from None
    return {k: v for k, v in values.items() if v is not None}


@dataclass(frozen=True)
class Setting:
    """One user-facing setting: its EngineConfig field, variable, flags, kind and help text."""

    field: str
    env: Optional[str]
    flags: tuple[str, ...]
    kind: str                      # int | bool | kv | fa | str | split | ts | rpc | seconds | mib | dir
    help: str
    minimum: int = 0
    off_flags: tuple[str, ...] = ()    # a bool's flags that turn it off, as llama.cpp's --no-X

    def parse(self, raw: Any, source: str) -> Any:
        if self.kind == "kv":
            return check_kv_type(source, raw, allow_auto=True)
        if self.kind == "mib":
            return check_cache_ram(source, raw)
        if self.kind == "dir":
            return check_directory(source, raw)
        if self.kind == "fa":
            return check_flash_attn(source, raw)
        if self.kind == "bool":
            return check_bool(source, raw)
        if self.kind == "int":
            return check_int(source, raw, minimum=self.minimum, text=True)
        if self.kind == "split":
            return check_split_mode(source, raw)
        if self.kind == "ts":
            return check_tensor_split(source, raw)
        if self.kind == "rpc":
            from pyllm.rpc import check_rpc_servers

            return check_rpc_servers(source, raw)
        if self.kind == "seconds":
            return check_seconds(source, raw, maximum=86400)
        return raw


SETTINGS: tuple[Setting, ...] = (
    Setting("model_path", "MODEL_PATH", ("-m", "--model"), "str", "GGUF model file (default: the default model)"),
    Setting("chat_template", "MODEL_CHAT_TEMPLATE", ("--chat-template",), "str",
            "chat template: a name (glm4, a shipped template, a llama.cpp built-in), a .jinja path or template "
            "text (default: the GGUF's tokenizer.chat_template)"),
    Setting("n_ctx", "MAX_CONTEXT_LENGTH", ("-c", "--ctx-size"), "int",
            f"context length in tokens (default {DEFAULT_N_CTX}; 0 = the model's training context)"),
    Setting("n_batch", "LLAMA_BATCH_SIZE", ("-b", "--batch-size"), "int",
            f"logical batch, max tokens per llama_decode (default min({DEFAULT_N_BATCH}, n_ctx))", 1),
    Setting("n_ubatch", "LLAMA_UBATCH_SIZE", ("-ub", "--ubatch-size"), "int",
            f"physical batch (default min({DEFAULT_N_UBATCH}, n_batch))", 1),
    Setting("n_gpu_layers", "GPU_LAYERS", ("-ngl", "--gpu-layers", "--n-gpu-layers"), "int",
            "layers offloaded to the GPU; -1 or 99 = all (default: all where a GPU is visible, else 0)", -1),
    Setting("n_threads", "LLAMA_THREADS", ("-t", "--threads"), "int",
            "threads for generation and batches (default: the CPUs available)", 1),
    Setting("n_parallel", "LLAMA_PARALLEL", ("-np", "--parallel"), "int",
            "sequences decoded at once (default 1)", 1),
    Setting("kv_unified", "LLAMA_ARG_KV_UNIFIED", ("-kvu", "--kv-unified"), "bool",
            "one KV pool shared by all sequences (default 1); -no-kvu/--no-kv-unified gives each of the -np "
            "sequences n_ctx / n_parallel cells (llama.cpp's split streams)",
            off_flags=("-no-kvu", "--no-kv-unified")),
    Setting("seed", "LLAMA_SEED", ("--seed",), "int", "sampling seed (default: random)"),
    Setting("use_mlock", "USE_MLOCK", (), "bool", "lock the model in RAM (1/0)"),
    Setting("use_mmap", "USE_MMAP", (), "bool", "memory-map the model file (1/0, default 1)"),
    Setting("flash_attn", "FLASH_ATTN", ("-fa", "--flash-attn"), "fa",
            "flash attention: auto, on, off (default auto: on where supported, required by a quantized V)"),
    Setting("kv_cache_type", "KV_CACHE_TYPE", ("--kv-cache-type",), "kv",
            f"K and V cache type: {' '.join(KV_CACHE_TYPES)} (default f16); auto: the highest-fidelity pair "
            "whose context fits the free memory (generate, chat, serve)"),
    Setting("kv_cache_type_k", "KV_CACHE_TYPE_K", ("-ctk", "--cache-type-k"), "kv",
            "K cache type (overrides KV_CACHE_TYPE for K; auto: chosen to fit)"),
    Setting("kv_cache_type_v", "KV_CACHE_TYPE_V", ("-ctv", "--cache-type-v"), "kv",
            "V cache type (overrides KV_CACHE_TYPE for V; auto: chosen to fit)"),
    Setting("split_mode", "LLAMA_SPLIT_MODE", ("-sm", "--split-mode"), "split",
            "how to split the model over several devices: none (main GPU only), layer, row (default layer)"),
    Setting("tensor_split", "LLAMA_TENSOR_SPLIT", ("-ts", "--tensor-split"), "ts",
            "share of the offloaded layers per device, in device order (RPC servers first), e.g. 3,1 "
            "(default: by free memory)"),
    Setting("main_gpu", "LLAMA_MAIN_GPU", ("-mg", "--main-gpu"), "int",
            "the device for the whole model with -sm none, for intermediate results with -sm row (default 0)"),
    Setting("rpc_servers", "LLAMA_RPC_SERVERS", ("--rpc",), "rpc",
            "llama.cpp RPC servers whose devices the model may use, host:port,... (see `pyllm rpc-server`)"),
    Setting("rpc_timeout", "LLAMA_RPC_TIMEOUT", ("--rpc-timeout",), "seconds",
            "seconds an RPC server may take to answer one command before the process ends naming it (default 120)"),
    Setting("repack", "LLAMA_ARG_REPACK", ("--repack",), "bool",
            "repack weights for the CPU's faster kernels (llama.cpp's extra buffer types; default on); "
            "-nr/--no-repack keeps them as stored, e.g. for a CPU run that must match an RPC split bit for bit",
            off_flags=("-nr", "--no-repack")),
    Setting("backend_sampling", "LLAMA_ARG_BACKEND_SAMPLING", ("-bs", "--backend-sampling"), "bool",
            "sample inside the decode graph on the model's output device where the request's sampler chain "
            "allows it (llama.cpp's experimental backend sampling; greedy, top-k, top-p, min-p, temperature, "
            "penalties, logit bias, dist), else on the CPU per request (default off)",
            off_flags=("--no-backend-sampling",)),
    Setting("cache_ram_mib", "LLAMA_ARG_CACHE_RAM", ("-cram", "--cache-ram"), "mib",
            f"MiB of host memory for cached prompt states (llama-server's --cache-ram; -1 = no limit, 0 = off; "
            f"default {LLAMA_SERVER_CACHE_RAM_MIB}, at most a quarter of physical memory)", -1),
    Setting("slot_save_path", "LLAMA_ARG_SLOT_SAVE_PATH", ("--slot-save-path",), "dir",
            "directory for saved slot states (POST /slots/{id}?action=save|restore; default: disabled); "
            "it must exist"),
)
SETTINGS_BY_FIELD = {s.field: s for s in SETTINGS}
ENV_VARS: dict[str, str] = {s.env: s.help for s in SETTINGS if s.env}


@dataclass
class EngineConfig:
    """What the engine loads and how: one field per llama.cpp knob a user sets.

    ``kv_cache_type_k`` / ``kv_cache_type_v``: the data type of the attention K and V caches
    (one of ``f32 f16 bf16 q8_0 q4_0 q4_1 iq4_nl q5_0 q5_1``); ``None`` keeps llama.cpp's
    default (f16). A quantized V cache needs flash attention (``flash_attn`` ``auto`` or ``on``).
    """

    model_path: Optional[str] = None          # None: the default model (see pyllm.default_model)
    chat_template: Optional[str] = None       # None: the model's own template
    n_ctx: int = DEFAULT_N_CTX                # max context length (tokens); 0 = the model's training context
    n_batch: Optional[int] = None             # logical batch, max tokens per llama_decode (None: min(2048, n_ctx))
    n_ubatch: Optional[int] = None            # physical batch (None: min(512, n_batch))
    n_gpu_layers: Optional[int] = None        # -ngl; -1 or >= n_layer = all; None: all where a GPU is visible, else 0
    use_mmap: bool = True
    use_mlock: bool = False
    n_threads: Optional[int] = None           # None: the CPUs available to the process
    n_threads_batch: Optional[int] = None
    flash_attn: str = "auto"                  # auto | on | off (-fa)
    kv_cache_type_k: Optional[str] = None     # -ctk
    kv_cache_type_v: Optional[str] = None     # -ctv
    seed: Optional[int] = None                # None: random; the engine's default for sampled generation
    offload_kqv: bool = True                  # keep the KV cache and attention on the GPU when offloading
    n_parallel: int = 1                       # -np: sequences decoded at once (the batched engine)
    kv_unified: bool = True                   # one KV pool shared by all sequences (False: n_ctx / n_parallel each)
    split_mode: str = "layer"                 # -sm: none | layer | row
    tensor_split: Optional[tuple[float, ...]] = None   # -ts: share per device (None: by free memory)
    main_gpu: int = 0                         # -mg
    rpc_servers: Optional[tuple[str, ...]] = None      # --rpc: host:port of llama.cpp RPC servers
    rpc_timeout: float = 120.0                # --rpc-timeout: seconds per RPC command (then the process ends)
    repack: bool = True                       # --repack / -nr, --no-repack: CPU weight repacking (use_extra_bufts)
    backend_sampling: bool = False            # -bs: sampler chains run in the decode graph where they can
    cache_ram_mib: Optional[int] = None       # --cache-ram: MiB for cached prompt states; -1 no limit, 0 off;
                                              # None: unset: no host tier in the library; `pyllm serve` uses
                                              # default_cache_ram_mib() (8192, <= a quarter of physical RAM)
    slot_save_path: Optional[str] = None      # --slot-save-path: an existing directory for slot files; None: off
    # Where values came from when not from an argument ("-m", "MODEL_PATH (from box.env)"), by field: for
    # errors found later, e.g. a model file that does not exist.
    sources: dict[str, str] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.model_path is not None:
            if not isinstance(self.model_path, (str, os.PathLike)) or not str(self.model_path).strip():
                raise ConfigError(f"model_path={self.model_path!r} is not a path; expected a GGUF file path or None")
            self.model_path = os.fspath(self.model_path)
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise ConfigError(f"chat_template={self.chat_template!r} is not a string; expected a template name, a .jinja path or template text")
        check_n_ctx(self.n_ctx)
        if self.n_batch is None:
            self.n_batch = min(DEFAULT_N_BATCH, self.n_ctx) if self.n_ctx else DEFAULT_N_BATCH
        if self.n_ubatch is None and isinstance(self.n_batch, int):
            self.n_ubatch = min(DEFAULT_N_UBATCH, self.n_batch)
        check_batch_sizes(self.n_ctx, self.n_batch, self.n_ubatch)
        if self.n_gpu_layers is not None:
            check_int("n_gpu_layers", self.n_gpu_layers, minimum=-1, what=" (-1 = all layers)")
        for name in ("use_mmap", "use_mlock", "offload_kqv", "kv_unified", "repack", "backend_sampling"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} is not a bool; expected True or False")
        check_threads("n_threads", self.n_threads)
        check_threads("n_threads_batch", self.n_threads_batch)
        check_parallel(self.n_parallel, self.n_batch, self.n_ctx)
        self.flash_attn = check_flash_attn("flash_attn", self.flash_attn)
        for name in ("kv_cache_type_k", "kv_cache_type_v"):
            if getattr(self, name) is not None:
                setattr(self, name, check_kv_type(self.source(name), getattr(self, name), allow_auto=True))
        if self.seed is not None:
            check_int("seed", self.seed, minimum=0, maximum=2**32 - 1)
        check_v_needs_flash_attn(self.effective_type_v, self.flash_attn)
        self.split_mode = check_split_mode("split_mode", self.split_mode)
        self.tensor_split = check_tensor_split("tensor_split", self.tensor_split)
        check_int("main_gpu", self.main_gpu, minimum=0, maximum=255)
        from pyllm.rpc import check_rpc_servers

        self.rpc_servers = check_rpc_servers("rpc_servers", self.rpc_servers)
        self.rpc_timeout = check_seconds("rpc_timeout", self.rpc_timeout, maximum=86400)
        if self.cache_ram_mib is not None:   # None: unset (the library keeps no host tier; serve applies the default)
            self.cache_ram_mib = check_cache_ram(self.source("cache_ram_mib"), self.cache_ram_mib)
        if self.slot_save_path is not None:
            self.slot_save_path = check_directory(self.source("slot_save_path"), self.slot_save_path)

    @property
    def kv_auto(self) -> bool:
        """Whether K or V is ``auto``: the config must go through pyllm.plan.resolve_kv_auto before a context
        is created from it."""
        return KV_AUTO in (self.kv_cache_type_k, self.kv_cache_type_v)

    @property
    def effective_type_k(self) -> str:
        return self.kv_cache_type_k or DEFAULT_KV_CACHE_TYPE

    @property
    def effective_type_v(self) -> str:
        return self.kv_cache_type_v or DEFAULT_KV_CACHE_TYPE

    def replace(self, **changes: Any) -> "EngineConfig":
        sources = {k: v for k, v in self.sources.items() if k not in changes}
        return dataclasses.replace(self, **{"sources": sources, **changes})

    def source(self, field: str) -> str:
        """Where ``field``'s value came from (a flag, ``VAR``, ``VAR (from FILE)``), else the field's name."""
        return self.sources.get(field, field)

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None, *, env_file: Optional[str] = None,
                 **overrides: Any) -> "EngineConfig":
        """A config from the environment (and a ``.env`` file); explicit keyword arguments win.

        ``env_file`` (else ``PYLLM_ENV_FILE``): a ``.env`` file read under the environment, whose real
        variables take precedence. KV types: argument > KV_CACHE_TYPE_K / _V > KV_CACHE_TYPE > f16. An
        invalid value raises ConfigError naming the variable (and the file); it never falls back.
        """
        source = env if isinstance(env, Environment) else Environment(env, env_file)
        sources: dict[str, str] = {}
        kw = settings_from_env(source, sources=sources)
        kw.update(overrides)
        return cls.build(kw, {k: v for k, v in sources.items() if k not in overrides})

    @classmethod
    def build(cls, kw: dict[str, Any], sources: Optional[Mapping[str, str]] = None) -> "EngineConfig":
        """A config from setting values by field name (``kv_cache_type`` sets both sides where unset);
        ``sources``: where each came from, by field name (see :meth:`source`)."""
        kw = dict(kw)
        kw["sources"] = dict(sources or {})
        both = kw.pop("kv_cache_type", None)
        if both is not None:
            kw.setdefault("kv_cache_type_k", both)
            kw.setdefault("kv_cache_type_v", both)
        if kw.get("n_threads") is not None and kw.get("n_threads_batch") is None:
            kw["n_threads_batch"] = kw["n_threads"]
        try:
            return cls(**kw)
        except TypeError as exc:
            raise ConfigError(f"invalid EngineConfig argument: {exc}") from None


def settings_from_env(env: Environment, fields: Optional[Iterable[str]] = None,
                      sources: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Parsed values of the settings whose variables are set (blank counts as unset); ``sources`` (when
    given) receives where each came from (``VAR`` or ``VAR (from FILE)``), by field name."""
    wanted = set(fields) if fields is not None else None
    out: dict[str, Any] = {}
    for s in SETTINGS:
        if s.env is None or (wanted is not None and s.field not in wanted):
            continue
        raw = env.get(s.env)
        if raw is None or not raw.strip():
            continue
        out[s.field] = s.parse(raw if s.field == "chat_template" else raw.strip(), env.source(s.env))
        if sources is not None:
            sources[s.field] = env.source(s.env)
    return out
