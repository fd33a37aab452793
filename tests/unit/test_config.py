"""KV type parsing, EngineConfig validation and the environment's precedence rules."""
from __future__ import annotations

import pytest

from pyllm._ffi import lib
from pyllm.config import EngineConfig
from pyllm.errors import ConfigError
from pyllm.kvtypes import KV_CACHE_TYPES, parse_kv_cache_type


@pytest.mark.parametrize("name, const", [("q8_0", "GGML_TYPE_Q8_0"), ("q4_0", "GGML_TYPE_Q4_0"), ("f16", "GGML_TYPE_F16"),
                                         ("Q8_0", "GGML_TYPE_Q8_0"), ("  q4_0 \n", "GGML_TYPE_Q4_0"),
                                         ("IQ4_NL", "GGML_TYPE_IQ4_NL"), ("BF16", "GGML_TYPE_BF16")])
def test_parse_kv_cache_type(name, const):
    assert parse_kv_cache_type(name) == getattr(lib, const)


@pytest.mark.parametrize("name", ["q6_k", "q8_k", "q4_k", "q2_k", "invalid", "", "q8", "f64", "i8", "mxfp4", None, 8])
def test_parse_rejects_non_kv_types(name):
    assert parse_kv_cache_type(name) is None


def test_every_accepted_name_parses():
    assert KV_CACHE_TYPES == ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
    assert all(parse_kv_cache_type(n) is not None for n in KV_CACHE_TYPES)


def test_defaults_keep_llama_cpp_f16():
    cfg = EngineConfig()
    assert cfg.kv_cache_type_k is None and cfg.kv_cache_type_v is None
    assert cfg.effective_type_k == cfg.effective_type_v == "f16"
    assert cfg.flash_attn == "auto"


def test_config_canonicalises_kv_names():
    cfg = EngineConfig(kv_cache_type_k="Q8_0", kv_cache_type_v=" q4_0 ")
    assert (cfg.kv_cache_type_k, cfg.kv_cache_type_v) == ("q8_0", "q4_0")


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"kv_cache_type_k": "q6_k"}, "kv_cache_type_k='q6_k' is not a KV cache type; expected one of: f32, f16"),
        ({"kv_cache_type_v": "fp8"}, "kv_cache_type_v='fp8'"),
        ({"flash_attn": "maybe"}, "flash_attn='maybe' is not valid; expected one of: auto, on, off"),
        ({"n_ctx": -1}, "n_ctx=-1 is out of range"),
        ({"n_batch": 0}, "n_batch=0 is out of range"),
        ({"n_ctx": 256, "n_batch": 512}, "n_batch=512 is larger than n_ctx=256"),
        ({"n_batch": 64, "n_ubatch": 128}, "n_ubatch=128 is larger than n_batch=64"),
        ({"n_threads": 0}, "n_threads=0 is out of range"),
        ({"n_gpu_layers": -5}, "n_gpu_layers=-5 is out of range"),
        ({"n_ctx": "4096"}, "n_ctx='4096' is not an integer"),
        ({"kv_cache_type_v": "q8_0", "flash_attn": "off"}, "requires flash attention, but flash_attn is 'off'"),
        ({"seed": -1}, "seed=-1 is out of range"),
    ],
)
def test_invalid_values_name_field_value_and_accepted(kwargs, fragment):
    with pytest.raises(ConfigError) as info:
        EngineConfig(**kwargs)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_batch_defaults_follow_small_contexts():
    cfg = EngineConfig(n_ctx=256)
    assert (cfg.n_batch, cfg.n_ubatch) == (256, 256)
    assert (EngineConfig().n_batch, EngineConfig().n_ubatch) == (2048, 512)


def test_from_env_reads_every_variable():
    env = {
        "MODEL_PATH": "/models/x.gguf", "MODEL_CHAT_TEMPLATE": "chatml", "MAX_CONTEXT_LENGTH": "120000",
        "LLAMA_BATCH_SIZE": "4096", "LLAMA_UBATCH_SIZE": "1024", "GPU_LAYERS": "99", "LLAMA_THREADS": "8",
        "USE_MLOCK": "true", "FLASH_ATTN": "ON", "KV_CACHE_TYPE": "q8_0",
    }
    cfg = EngineConfig.from_env(env)
    assert cfg.model_path == "/models/x.gguf" and cfg.chat_template == "chatml"
    assert (cfg.n_ctx, cfg.n_batch, cfg.n_ubatch, cfg.n_gpu_layers) == (120000, 4096, 1024, 99)
    assert (cfg.n_threads, cfg.n_threads_batch, cfg.use_mlock, cfg.flash_attn) == (8, 8, True, "on")
    assert (cfg.kv_cache_type_k, cfg.kv_cache_type_v) == ("q8_0", "q8_0")


@pytest.mark.parametrize(
    "env, overrides, expected",
    [
        ({}, {}, (None, None)),
        ({"KV_CACHE_TYPE": "q8_0"}, {}, ("q8_0", "q8_0")),
        ({"KV_CACHE_TYPE": "q8_0", "KV_CACHE_TYPE_V": "q4_0"}, {}, ("q8_0", "q4_0")),
        ({"KV_CACHE_TYPE": "q8_0", "KV_CACHE_TYPE_K": "f16"}, {}, ("f16", "q8_0")),
        ({"KV_CACHE_TYPE_K": "q5_1"}, {}, ("q5_1", None)),
        ({"KV_CACHE_TYPE": "q8_0", "KV_CACHE_TYPE_K": "q4_0"}, {"kv_cache_type_k": "q5_0"}, ("q5_0", "q8_0")),
        ({"KV_CACHE_TYPE": "q4_0"}, {"kv_cache_type_v": "f16"}, ("q4_0", "f16")),
        ({"KV_CACHE_TYPE": "  "}, {}, (None, None)),
    ],
)
def test_kv_precedence_argument_then_side_then_both(env, overrides, expected):
    cfg = EngineConfig.from_env(env, **overrides)
    assert (cfg.kv_cache_type_k, cfg.kv_cache_type_v) == expected


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"KV_CACHE_TYPE": "q8"}, "KV_CACHE_TYPE='q8' is not a KV cache type"),
        ({"KV_CACHE_TYPE_K": "q6_k"}, "KV_CACHE_TYPE_K='q6_k'"),
        ({"KV_CACHE_TYPE_V": "int8"}, "KV_CACHE_TYPE_V='int8'"),
        ({"MAX_CONTEXT_LENGTH": "lots"}, "MAX_CONTEXT_LENGTH='lots' is not an integer"),
        ({"LLAMA_BATCH_SIZE": "0"}, "LLAMA_BATCH_SIZE='0' is out of range"),
        ({"GPU_LAYERS": "-2"}, "GPU_LAYERS='-2' is out of range"),
        ({"USE_MLOCK": "sometimes"}, "USE_MLOCK='sometimes' is not a boolean"),
        ({"FLASH_ATTN": "yes please"}, "FLASH_ATTN='yes please' is not valid"),
        ({"KV_CACHE_TYPE": "q8_0", "FLASH_ATTN": "off"}, "requires flash attention"),
    ],
)
def test_from_env_invalid_values_name_the_variable(env, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        EngineConfig.from_env(env)
    assert fragment in str(info.value)


def test_from_env_unknown_override_is_a_config_error():
    with pytest.raises(ConfigError, match="invalid EngineConfig argument"):
        EngineConfig.from_env({}, no_such_field=1)
