"""kv_cache_bytes(): llama_kv_cache's own K and V byte counts, for owned and borrowed contexts alike."""
from __future__ import annotations

import pytest

from pyllm.context import Context
from pyllm.kvtypes import block_size, parse_kv_cache_type, type_size
from pyllm.model import Model


def _row_bytes(name: str, n_values: int) -> int:
    t = parse_kv_cache_type(name)
    return n_values // block_size(t) * type_size(t)


@pytest.mark.parametrize("k, v", [("f16", "f16"), ("q8_0", "q4_0"), ("q4_0", "f16")])
def test_gqa_k_and_v_bytes_are_exact(gqa_model_path, k, v):
    # write_llama defaults: n_embd 256, 4 layers, 8 heads of 32, 2 KV heads -> 64 K and 64 V values per layer and cell.
    with Model(gqa_model_path) as model, Context(model, n_ctx=512, n_batch=512, type_k=k, type_v=v) as ctx:
        kv = ctx.kv_cache_bytes()
        assert kv.n_cells == (512,)
        assert kv.k == 4 * 512 * _row_bytes(k, 64) and kv.v == 4 * 512 * _row_bytes(v, 64)
        assert kv.total == kv.k + kv.v == sum(kv.devices.values())


def test_a_borrowed_context_reports_the_same_split(gqa_model_path):
    with Model(gqa_model_path) as model, Context(model, n_ctx=512, n_batch=512, type_k="q8_0", type_v="f16") as ctx:
        borrowed = Context.from_address(model, ctx.address)
        mine, theirs = ctx.kv_cache_bytes(), borrowed.kv_cache_bytes()
        assert (theirs.k, theirs.v, theirs.total) == (mine.k, mine.v, mine.total)
        assert theirs.k == 4 * 512 * _row_bytes("q8_0", 64) != theirs.v  # no total // 2 guess
        borrowed.close()  # not owned: the context stays usable
        assert ctx.kv_cache_bytes().total > 0


def test_sliding_window_model_reports_both_caches(default_model_path):
    # Gemma 3 keeps a full-attention cache and a smaller sliding-window cache.
    with Model(default_model_path) as model, Context(model, n_ctx=4096, n_batch=512) as ctx:
        kv = ctx.kv_cache_bytes()
        assert len(kv.n_cells) == 2 and kv.n_cells[0] == 4096 and kv.n_cells[1] < 4096
        assert kv.k == kv.v and kv.total == kv.k + kv.v == sum(kv.devices.values())


def test_mla_model_k_and_v(mla_model_path):
    with Model(mla_model_path) as model, Context(model, n_ctx=256, n_batch=256, type_k="q8_0", type_v="q8_0") as ctx:
        kv = ctx.kv_cache_bytes()
        assert kv.k > 0 and kv.total == kv.k + kv.v == sum(kv.devices.values())
