"""--cache-ram, --slot-save-path and KV_CACHE_TYPE=auto as settings: names, parsing, limits, the CLI."""
from __future__ import annotations

import pytest

from pyllm import config as config_mod
from pyllm.cli import _config_from_args, build_parser
from pyllm.config import (SETTINGS_BY_FIELD, EngineConfig, Environment, check_cache_ram, default_cache_ram_mib,
                          kv_pairs)
from pyllm.errors import ConfigError, KVCacheConfigError
from pyllm.plan import AUTO_KV_PAIRS, auto_kv_candidates

GiB = 2**30


def test_names_are_llama_servers():
    ram, path = SETTINGS_BY_FIELD["cache_ram_mib"], SETTINGS_BY_FIELD["slot_save_path"]
    assert (ram.env, ram.flags) == ("LLAMA_ARG_CACHE_RAM", ("-cram", "--cache-ram"))   # common/arg.cpp
    assert (path.env, path.flags) == ("LLAMA_ARG_SLOT_SAVE_PATH", ("--slot-save-path",))


@pytest.mark.parametrize("physical, expected", [(24 * GiB, 6144), (64 * GiB, 8192), (8 * GiB, 2048)])
def test_default_is_llama_servers_capped_at_a_quarter_of_physical_memory(physical, expected):
    assert default_cache_ram_mib(physical) == expected


def test_default_where_the_system_does_not_say_is_llama_servers(monkeypatch):
    monkeypatch.setattr(config_mod, "physical_memory_bytes", lambda: None)
    assert default_cache_ram_mib() == 8192


def test_unset_stays_unset_in_the_library_and_serve_applies_the_default(monkeypatch):
    monkeypatch.setattr(config_mod, "physical_memory_bytes", lambda: 24 * GiB)
    assert EngineConfig().cache_ram_mib is None      # the library keeps no host tier unless asked
    assert default_cache_ram_mib() == 6144           # what `pyllm serve` uses when unset
    assert EngineConfig(cache_ram_mib=0).cache_ram_mib == 0
    assert EngineConfig(cache_ram_mib=-1).cache_ram_mib == -1


def test_more_than_physical_memory_is_refused_naming_the_source(monkeypatch):
    monkeypatch.setattr(config_mod, "physical_memory_bytes", lambda: 24 * GiB)
    assert check_cache_ram("--cache-ram", "24576") == 24576
    with pytest.raises(ConfigError, match=r"LLAMA_ARG_CACHE_RAM=24577 MiB is more than this machine's physical "
                                          r"memory \(24,576 MiB\)"):
        EngineConfig.from_env({"LLAMA_ARG_CACHE_RAM": "24577"})


@pytest.mark.parametrize("raw", ["-2", "lots", "1.5", ""])
def test_bad_cache_ram_values(raw):
    if raw == "":   # blank counts as unset, as for every variable
        assert EngineConfig.from_env({"LLAMA_ARG_CACHE_RAM": raw}).cache_ram_mib is None
        return
    with pytest.raises(ConfigError, match="LLAMA_ARG_CACHE_RAM"):
        EngineConfig.from_env({"LLAMA_ARG_CACHE_RAM": raw})


def test_slot_save_path_must_be_an_existing_directory(tmp_path):
    assert EngineConfig.from_env({"LLAMA_ARG_SLOT_SAVE_PATH": str(tmp_path)}).slot_save_path == str(tmp_path)
    with pytest.raises(ConfigError, match="LLAMA_ARG_SLOT_SAVE_PATH=.*does not exist"):
        EngineConfig.from_env({"LLAMA_ARG_SLOT_SAVE_PATH": str(tmp_path / "missing")})
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        EngineConfig(slot_save_path=str(f))
    assert EngineConfig().slot_save_path is None


def test_env_file_values_name_the_file(tmp_path):
    env_file = tmp_path / "box.env"
    env_file.write_text(f"LLAMA_ARG_SLOT_SAVE_PATH={tmp_path / 'nope'}\n")
    with pytest.raises(ConfigError, match=r"LLAMA_ARG_SLOT_SAVE_PATH \(from .*box.env\)"):
        EngineConfig.from_env(Environment({}, str(env_file)))


def test_serve_takes_the_flags_and_flags_win_over_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_ARG_CACHE_RAM", "100")
    monkeypatch.delenv("PYLLM_ENV_FILE", raising=False)
    args = build_parser().parse_args(["serve", "--cache-ram", "-1", "--slot-save-path", str(tmp_path)])
    cfg = _config_from_args(args)
    assert (cfg.cache_ram_mib, cfg.slot_save_path) == (-1, str(tmp_path))
    assert cfg.source("cache_ram_mib") == "-cram"
    args = build_parser().parse_args(["serve"])
    assert _config_from_args(args).cache_ram_mib == 100
    with pytest.raises(SystemExit):   # generate does not take the serving flags
        build_parser().parse_args(["generate", "x", "--cache-ram", "5"])


# ---- KV_CACHE_TYPE=auto as a setting ----
def test_auto_is_accepted_by_the_config_for_either_side():
    cfg = EngineConfig.from_env({"KV_CACHE_TYPE": "AUTO"})
    assert (cfg.kv_cache_type_k, cfg.kv_cache_type_v, cfg.kv_auto) == ("auto", "auto", True)
    cfg = EngineConfig.from_env({"KV_CACHE_TYPE_K": "auto", "KV_CACHE_TYPE_V": "q8_0"})
    assert (cfg.kv_cache_type_k, cfg.kv_cache_type_v, cfg.kv_auto) == ("auto", "q8_0", True)
    assert not EngineConfig(kv_cache_type_k="q8_0", kv_cache_type_v="q8_0").kv_auto
    # flash attention off with V auto: auto will only pick an unquantized V, so the config is valid
    assert EngineConfig(kv_cache_type_v="auto", flash_attn="off").kv_auto


def test_list_commands_refuse_auto_with_a_clear_message():
    with pytest.raises(KVCacheConfigError, match="auto chooses one K/V pair before an engine loads"):
        kv_pairs(["auto"], None)
    with pytest.raises(KVCacheConfigError, match=r"'fast' is not a KV cache type; expected one of: .* or auto"):
        EngineConfig(kv_cache_type_k="fast")


def test_candidate_order():
    assert auto_kv_candidates("auto", "auto", "auto") == list(AUTO_KV_PAIRS) == [
        ("f16", "f16"), ("f16", "q8_0"), ("q8_0", "q8_0"), ("q8_0", "q4_0"), ("q4_0", "q4_0")]
    assert auto_kv_candidates("auto", "auto", "off") == [("f16", "f16"), ("q8_0", "f16"), ("q4_0", "f16")]
    assert auto_kv_candidates("q8_0", "auto", "on") == [("q8_0", "f16"), ("q8_0", "q8_0"), ("q8_0", "q4_0")]
    assert auto_kv_candidates("q8_0", "auto", "off") == [("q8_0", "f16")]
    assert auto_kv_candidates("auto", "q4_0", "on") == [("f16", "q4_0"), ("q8_0", "q4_0"), ("q4_0", "q4_0")]
