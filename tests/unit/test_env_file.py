"""Settings from .env files and the one set of rules: precedence, sources named in errors, list semantics."""
from __future__ import annotations

import pytest

from pyllm.config import ENV_VARS, SETTINGS, Environment, EngineConfig, kv_pairs
from pyllm.errors import ConfigError, KVCacheConfigError

SEED_ENV = """\
MODEL_PATH=/app/models/GLM-4.7-Flash-Q8_0.gguf
MODEL_CHAT_TEMPLATE=glm4
KV_CACHE_TYPE=q8_0
MAX_CONTEXT_LENGTH=120000
LLAMA_BATCH_SIZE=4096
GPU_LAYERS=99
"""


def test_the_seed_env_file_loads_and_every_line_takes_effect(tmp_path):
    path = tmp_path / "seed.env"
    path.write_text(SEED_ENV)
    cfg = EngineConfig.from_env({}, env_file=str(path))
    assert cfg.model_path == "/app/models/GLM-4.7-Flash-Q8_0.gguf"
    assert cfg.chat_template == "glm4"
    assert (cfg.kv_cache_type_k, cfg.kv_cache_type_v) == ("q8_0", "q8_0")
    assert (cfg.n_ctx, cfg.n_batch, cfg.n_gpu_layers) == (120000, 4096, 99)


def test_pyllm_env_file_variable_names_the_file(tmp_path):
    path = tmp_path / "box.env"
    path.write_text("MAX_CONTEXT_LENGTH=8192\n")
    assert EngineConfig.from_env({"PYLLM_ENV_FILE": str(path)}).n_ctx == 8192


def test_real_environment_variables_win_over_the_file(tmp_path):
    path = tmp_path / "x.env"
    path.write_text("KV_CACHE_TYPE=q4_0\nMAX_CONTEXT_LENGTH=2048\n")
    cfg = EngineConfig.from_env({"KV_CACHE_TYPE": "q8_0"}, env_file=str(path))
    assert cfg.kv_cache_type_k == "q8_0" and cfg.n_ctx == 2048


def test_inline_comments_quotes_and_export_are_read(tmp_path):
    path = tmp_path / "x.env"
    path.write_text("# a whole-line comment\nexport KV_CACHE_TYPE=q8_0   # holds 1.88x the tokens\n"
                    "MAX_CONTEXT_LENGTH='16384'\nFLASH_ATTN=\"on\"\n\n")
    cfg = EngineConfig.from_env({}, env_file=str(path))
    assert (cfg.kv_cache_type_v, cfg.n_ctx, cfg.flash_attn) == ("q8_0", 16384, "on")


def test_a_bad_value_in_the_file_names_the_file_the_variable_and_the_value(tmp_path):
    path = tmp_path / "bad.env"
    path.write_text("KV_CACHE_TYPE=q9_9\n")
    with pytest.raises(KVCacheConfigError) as info:
        EngineConfig.from_env({}, env_file=str(path))
    msg = str(info.value)
    assert f"KV_CACHE_TYPE (from {path})='q9_9' is not a KV cache type; expected one of: f32, f16" in msg
    assert "\n" not in msg


def test_a_bad_value_overriding_the_file_is_named_as_the_environment(tmp_path):
    path = tmp_path / "ok.env"
    path.write_text("GPU_LAYERS=99\n")
    with pytest.raises(ConfigError, match=r"^GPU_LAYERS='lots' is not an integer"):
        EngineConfig.from_env({"GPU_LAYERS": "lots"}, env_file=str(path))


@pytest.mark.parametrize("make, fragment", [(lambda p: p / "missing.env", "no such file"),
                                            (lambda p: p, "is a directory")])
def test_a_missing_env_file_is_a_config_error(tmp_path, make, fragment):
    with pytest.raises(ConfigError, match=fragment):
        Environment({}, str(make(tmp_path)))


def test_every_setting_with_a_variable_is_documented_once():
    envs = [s.env for s in SETTINGS if s.env]
    assert len(envs) == len(set(envs)) == len(ENV_VARS)
    assert {"LLAMA_PARALLEL", "KV_CACHE_TYPE", "GPU_LAYERS", "MODEL_CHAT_TEMPLATE"} <= set(ENV_VARS)


def test_one_wording_for_a_bad_kv_type_wherever_it_comes_from():
    with pytest.raises(KVCacheConfigError, match=r"^kv_cache_type_k='q9' is not a KV cache type; expected one of: f32"):
        EngineConfig(kv_cache_type_k="q9")
    with pytest.raises(KVCacheConfigError, match=r"^KV_CACHE_TYPE_K='q9' is not a KV cache type; expected one of: f32"):
        EngineConfig.from_env({"KV_CACHE_TYPE_K": "q9"})
    with pytest.raises(KVCacheConfigError, match=r"^-ctk='q9' is not a KV cache type; expected one of: f32"):
        kv_pairs(["q9"], None)


def test_kv_list_rule_pairs_or_cross_product():
    assert kv_pairs(["f16", "Q8_0"], None) == [("f16", "f16"), ("q8_0", "q8_0")]
    assert kv_pairs(["f16", "q8_0"], ["q4_0", "q8_0"]) == [("f16", "q4_0"), ("f16", "q8_0"), ("q8_0", "q4_0"),
                                                           ("q8_0", "q8_0")]
    with pytest.raises(KVCacheConfigError, match="-ctk is empty"):
        kv_pairs([], None)


def test_n_parallel_and_the_seed_are_settings():
    cfg = EngineConfig.from_env({"LLAMA_PARALLEL": "4", "LLAMA_SEED": "7"})
    assert (cfg.n_parallel, cfg.seed, cfg.kv_unified) == (4, 7, True)
    with pytest.raises(ConfigError, match=r"^LLAMA_PARALLEL='0' is out of range"):
        EngineConfig.from_env({"LLAMA_PARALLEL": "0"})


def test_gpu_layers_default_is_decided_at_load_time():
    assert EngineConfig().n_gpu_layers is None
    assert EngineConfig.from_env({"GPU_LAYERS": "0"}).n_gpu_layers == 0
