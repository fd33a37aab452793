"""pyllm plan against real allocations: the default model, a GQA llama and an MLA model."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pyllm.config import kv_pairs

from pyllm.context import Context
from pyllm.errors import ConfigError
from pyllm.model import Model
from pyllm.plan import GRANULE, Planner, make_plan, parse_memory


def _real_kv(path, n_ctx, k, v):
    with Model(path) as m, Context(m, n_ctx=n_ctx, n_batch=512, type_k=k, type_v=v) as ctx:
        return ctx.kv_cache_bytes().total


@pytest.mark.parametrize("k, v", [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "f16")])
def test_plan_matches_the_engine_on_the_default_model(default_model_path, k, v):
    plan = make_plan(str(default_model_path), pairs=[(k, v)], n_ctx=4096, memory="2GiB", n_batch=512)
    (row,) = plan.rows
    real = _real_kv(default_model_path, 4096, k, v)
    assert row.kv_bytes == pytest.approx(real, rel=0.01)
    assert row.max_ctx == 32768 and row.max_ctx_uncapped > row.max_ctx  # capped at n_ctx_train


@pytest.mark.parametrize("k", ["f16", "q8_0", "q4_0"])
def test_plan_matches_a_real_gqa_llama(gqa_model_path, k):
    (row,) = make_plan(str(gqa_model_path), pairs=[(k, k)], n_ctx=2048, memory="1GiB").rows
    assert row.kv_bytes == pytest.approx(_real_kv(gqa_model_path, 2048, k, k), rel=0.01)
    with Model(gqa_model_path) as m:
        head = m.n_embd // m.n_head
        # grouped-query attention: 2 KV heads, not 8
        from pyllm.kvtypes import bytes_per_value
        assert row.kv_bytes_per_token == pytest.approx(2 * m.n_layer * m.n_head_kv * head * bytes_per_value(k), rel=0.01)


@pytest.mark.parametrize("k", ["f16", "q8_0"])
def test_plan_matches_a_real_mla_model(mla_model_path, k):
    (row,) = make_plan(str(mla_model_path), pairs=[(k, k)], n_ctx=2048, memory="1GiB").rows
    assert row.kv_bytes == pytest.approx(_real_kv(mla_model_path, 2048, k, k), rel=0.01)
    # MLA caches one latent of kv_lora_rank + rope dims (128 + 32) per layer, far below K+V of 8 heads.
    from pyllm.kvtypes import bytes_per_value
    assert row.kv_bytes_per_token == pytest.approx(3 * 160 * bytes_per_value(k), rel=0.01)
    plain = 3 * 8 * (64 + 32) * 2 * 2  # 3 layers x 8 heads x (K 64 + V 32) x f16, as if uncompressed
    assert row.kv_bytes_per_token < plain / 4


def test_mla_refuses_mixed_types(mla_model_path):
    plan = make_plan(str(mla_model_path), pairs=[("q8_0", "f16")], n_ctx=1024, memory="1GiB")
    assert "requires equal K and V cache types" in plan.rows[0].error


def test_max_context_is_the_largest_that_fits(gqa_model_path):
    budget = parse_memory("24MiB")
    (row,) = make_plan(str(gqa_model_path), pairs=[("f16", "f16")], n_ctx=1024, memory="24MiB").rows
    assert 0 < row.max_ctx_uncapped
    with Planner(str(gqa_model_path)) as p:
        at, _ = p.measure(row.max_ctx_uncapped, "f16", "f16")
        above, _ = p.measure(row.max_ctx_uncapped + GRANULE, "f16", "f16")
    assert at.total <= budget < above.total


def test_quantized_kv_fits_more_context(gqa_model_path):
    plan = make_plan(str(gqa_model_path), pairs=kv_pairs(["f16", "q8_0", "q4_0"], None), n_ctx=1024, memory="64MiB")
    f16, q8, q4 = (r.max_ctx_uncapped for r in plan.rows)
    assert f16 < q8 < q4


@pytest.mark.parametrize("text, value", [("96GiB", 96 * 2**30), ("80 GB", 80 * 10**9), ("512MiB", 512 * 2**20),
                                         ("1.5GiB", int(1.5 * 2**30))])
def test_parse_memory(text, value):
    assert parse_memory(text) == value


@pytest.mark.parametrize("text", ["96", "lots", "-1GiB", "0GiB", "12 parsecs"])
def test_parse_memory_rejects(text):
    with pytest.raises(ConfigError, match="--memory"):
        parse_memory(text)


def test_cli_json_and_plot(gqa_model_path, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "plan.png"
    out = subprocess.run([sys.executable, "-c", "import sys; from pyllm.cli import main; sys.exit(main())", "plan",
                          "-m", str(gqa_model_path), "--memory", "64MiB", "-c", "1024", "--json", "--plot", str(png)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [r["type_k"] for r in data["rows"]] == ["f16", "q8_0", "q4_0"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
