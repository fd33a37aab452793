"""The compiled cffi layer: import, build identity, struct round-trips, ggml type facts."""
from __future__ import annotations

from pathlib import Path

import pytest

from pyllm._ffi import ffi, lib
from pyllm.buildinfo import build_info, fa_kernel_pairs
from pyllm.kvtypes import KV_CACHE_TYPES, block_size, parse_kv_cache_type, type_name, type_size
from pyllm import version

ROOT = Path(__file__).resolve().parents[2]


def test_version_file_matches_package_and_extension():
    assert (ROOT / "VERSION").read_text().strip() == version.VERSION == "8.15.1-kv-cache-quantization"
    assert ffi.string(lib.pyllm_build_version()).decode() == version.VERSION
    assert version.VERSION_NUMBER == "8.15.1"
    assert version.VERSION_PATCH == 1
    assert "kv-cache-quantization" in version.FEATURES
    assert any("kv_cache_type_k" in entry for entry in version.BREAKING_CHANGES["8.15.1"])


def test_build_info_names_the_pin_and_cpu_backend(fetch_module):
    pin = fetch_module.read_pin()
    info = build_info()
    assert info["llama_cpp_commit"] == pin["llama_cpp_commit"]
    assert info["llama_cpp_commit"].startswith("0c1e570")
    assert info["version"] == version.VERSION
    assert "CPU" in info["backends"]
    assert info["kv_cache_types"] == list(KV_CACHE_TYPES)
    assert "AVX" in info["system_info"] or "CPU" in info["system_info"]


def test_context_params_round_trip_kv_and_flash_attn_fields():
    params = lib.llama_context_default_params()
    assert params.type_k == lib.GGML_TYPE_F16 and params.type_v == lib.GGML_TYPE_F16
    params.type_k = lib.GGML_TYPE_Q8_0
    params.type_v = lib.GGML_TYPE_Q4_0
    params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
    params.n_ctx = 12345
    assert (params.type_k, params.type_v) == (lib.GGML_TYPE_Q8_0, lib.GGML_TYPE_Q4_0)
    assert params.flash_attn_type == lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
    assert params.n_ctx == 12345
    assert ffi.string(lib.llama_flash_attn_type_name(params.flash_attn_type)) == b"enabled"


@pytest.mark.parametrize(
    "name, size, blck",
    [("f32", 4, 1), ("f16", 2, 1), ("bf16", 2, 1), ("q8_0", 34, 32), ("q4_0", 18, 32), ("q4_1", 20, 32),
     ("iq4_nl", 18, 32), ("q5_0", 22, 32), ("q5_1", 24, 32)],
)
def test_every_kv_type_maps_to_its_ggml_type(name, size, blck):
    t = parse_kv_cache_type(name)
    assert t is not None
    assert type_name(t) == name
    assert type_size(t) == size
    assert block_size(t) == blck


def test_exact_structs_have_the_c_layout():
    # cffi verified these layouts at import; check the sizes a C user would see.
    assert ffi.sizeof("llama_token_data") == 12
    assert ffi.sizeof("llama_batch") == 4 + 6 * ffi.sizeof("void *") + 4  # int32 + padding + 6 pointers
    assert ffi.offsetof("llama_batch", "token") == ffi.sizeof("void *")


def test_fa_kernel_pairs_parsing():
    assert fa_kernel_pairs("") == []
    assert fa_kernel_pairs("q4_0-q4_0,q8_0-q8_0,f16-f16,bf16-bf16") == [
        ("f16", "f16"), ("q4_0", "q4_0"), ("q8_0", "q8_0"), ("bf16", "bf16")]
    assert len(fa_kernel_pairs("all")) == 49


def test_low_level_escape_hatch_reaches_llama_h():
    assert lib.llama_max_devices() >= 1
    assert isinstance(lib.llama_supports_mmap(), bool)
    assert lib.LLAMA_DEFAULT_SEED == 0xFFFFFFFF
