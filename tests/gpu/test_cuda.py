"""Full offload on a CUDA GPU: every layer and the KV cache on the device, for f16, q8_0 and q4_0."""
from __future__ import annotations

import warnings

import pytest

from pyllm.buildinfo import build_info, fa_kernel_pairs
from pyllm.config import EngineConfig
from pyllm.context import Context
from pyllm.engine import Engine
from pyllm.errors import KVCacheConfigError
from pyllm.model import Model

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def model(gpu_model_path):
    with Model(gpu_model_path, n_gpu_layers=99) as m:
        yield m


def test_build_reports_cuda(model):
    info = build_info()
    assert "CUDA" in info["backends"] and info["cuda_architectures"]
    assert ("q8_0", "q8_0") in fa_kernel_pairs(info["cuda_fa_quants"])


def test_full_offload_puts_the_weights_on_the_device(model):
    with Context(model, n_ctx=1024, n_batch=512) as ctx:
        rows = {r["name"]: r for r in ctx.memory_breakdown()}
    gpu = [r for name, r in rows.items() if name.startswith("CUDA") and not r["is_host"]]
    assert gpu and sum(r["model"] for r in gpu) > 0.9 * model.size


@pytest.mark.parametrize("kv", ["f16", "q8_0", "q4_0"])
def test_generation_on_the_device_is_deterministic(model, gpu_model_path, kv):
    cfg = EngineConfig(model_path=str(gpu_model_path), n_ctx=2048, n_gpu_layers=99, flash_attn="on",
                       kv_cache_type_k=kv, kv_cache_type_v=kv)
    with Engine(cfg, model=model) as engine:
        a = engine.generate(PROMPT, max_tokens=32, ignore_eos=True)
        engine.reset()
        b = engine.generate(PROMPT, max_tokens=32, ignore_eos=True)
        kvb = engine.kv_cache_bytes()
        assert engine.context.flash_attn
    assert a.tokens == b.tokens and a.n_generated == 32
    on_device = {name: n for name, n in kvb.devices.items() if name.startswith("CUDA")}
    assert on_device and sum(on_device.values()) == kvb.total  # the whole KV cache lives on the GPU


def test_kv_bytes_ratio_on_the_device(model):
    sizes = {}
    for kv in ("f16", "q8_0", "q4_0"):
        with Context(model, n_ctx=4096, n_batch=512, type_k=kv, type_v=kv, flash_attn="on") as ctx:
            sizes[kv] = ctx.kv_cache_bytes().total
    assert sizes["q8_0"] / sizes["f16"] == pytest.approx(34 / 64, rel=0.01)
    assert sizes["q4_0"] / sizes["f16"] == pytest.approx(18 / 64, rel=0.01)


def test_error_paths_on_the_device(model):
    with pytest.raises(KVCacheConfigError, match="requires flash attention"):
        Context(model, n_ctx=512, n_batch=512, type_k="q8_0", type_v="q8_0", flash_attn="off")
    missing = ("q8_0", "q4_0")
    if missing not in fa_kernel_pairs(build_info()["cuda_fa_quants"]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Context(model, n_ctx=512, n_batch=512, type_k="q8_0", type_v="q4_0", flash_attn="on").close()
        assert any("PYLLM_CUDA_FA_QUANTS" in str(w.message) for w in caught)


@pytest.mark.parametrize("kv", ["f16", "q8_0", "q4_0"])
def test_plan_on_the_device_matches_the_allocation(model, gpu_model_path, kv):
    from pyllm.devices import gpus
    from pyllm.plan import make_plan

    plan = make_plan(str(gpu_model_path), pairs=[(kv, kv)], n_ctx=8192, memory="gpu", n_gpu_layers=99, n_batch=512,
                     flash_attn="on")
    (row,) = plan.rows
    assert plan.budget_source.startswith("free memory of CUDA") and 0 < plan.budget <= gpus()[0].total
    with Context(model, n_ctx=8192, n_batch=512, type_k=kv, type_v=kv, flash_attn="on") as ctx:
        real = ctx.kv_cache_bytes()
    assert row.kv_bytes == pytest.approx(real.total, rel=0.01)
    kv_where = {name: d["context"] for name, d in row.devices.items() if d["context"]}
    assert kv_where and all(n.startswith("CUDA") and "host" not in n.lower() for n in kv_where), kv_where
    assert row.max_ctx == min(row.max_ctx_uncapped, row.n_ctx_train) and row.max_ctx > 8192


def test_labels_name_the_gpu_the_layers_run_on(model, gpu_model_path):
    with Context(model, n_ctx=1024, n_batch=512) as ctx:
        assert ctx.weight_devices() == ["CUDA0"]
    with Model(gpu_model_path, n_gpu_layers=2) as partial, Context(partial, n_ctx=1024, n_batch=512) as ctx:
        assert ctx.weight_devices() == ["CUDA0", "CPU"]
    info = build_info()
    assert info["supports_gpu_offload"] is True and info["gpu_devices"][0].startswith("CUDA0 (")
