"""pyllm plan against real allocations: the default model, a GQA llama and an MLA model."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pyllm.batched import BatchedEngine
from pyllm.config import EngineConfig, kv_pairs
from pyllm.context import Context
from pyllm.errors import ConfigError
from pyllm.model import Model
from pyllm.plan import GRANULE, LLAMA_MAX_SEQ, Planner, make_plan, parse_memory

CLI = [sys.executable, "-c", "import sys; from pyllm.cli import main; sys.exit(main())"]


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


# ---- -np: plan's figures are what serve / BatchedEngine allocate with the same flags ----
@pytest.fixture(scope="module", params=["default (SWA)", "gqa (no SWA)"])
def np_model(request, default_model_path, gqa_model_path):
    """The default model (Gemma 3: sliding-window layers, whose cache grows with n_seq_max in a unified pool)
    and a synthetic llama without SWA, loaded once for real allocations."""
    path = default_model_path if request.param.startswith("default") else gqa_model_path
    with Model(path) as m:
        yield m


def _engine(model, **flags) -> BatchedEngine:
    """What `pyllm serve` builds from the same flags: BatchedEngine(EngineConfig)."""
    return BatchedEngine(EngineConfig(model_path=str(model.path), **flags), model=model)


@pytest.mark.parametrize("n_parallel, unified", [(1, True), (2, True), (4, True), (8, True),
                                                 (2, False), (3, False), (4, False), (8, False)])
def test_plan_np_equals_the_batched_engine_allocation(np_model, n_parallel, unified):
    pairs = [("f16", "f16"), ("q8_0", "q8_0")]
    # A budget nothing fits ends the searches at once: this test is about the figures at -c 4096.
    plan = make_plan(str(np_model.path), pairs=pairs, n_ctx=4096, memory="1MiB", n_parallel=n_parallel,
                     kv_unified=unified)
    assert [(r.type_k, r.type_v) for r in plan.rows] == pairs and all(r.error is None for r in plan.rows)
    assert len(plan.concurrency) == (2 if n_parallel > 1 else 0)
    for i, (k, v) in enumerate(pairs):
        with _engine(np_model, n_ctx=4096, n_parallel=n_parallel, kv_unified=unified, kv_cache_type_k=k,
                     kv_cache_type_v=v) as eng:
            kv = eng.kv_cache_bytes().total
            compute = sum(r["compute"] for r in eng.context.memory_breakdown())
            n_ctx, n_ctx_seq = eng.n_ctx, eng.n_ctx_seq
        row = plan.rows[i]
        assert (row.n_ctx, row.kv_bytes, row.compute_bytes) == (n_ctx, kv, compute)
        if n_parallel > 1:
            c = plan.concurrency[i]
            assert (c.n_ctx, c.kv_bytes, c.total_bytes) == (n_ctx, kv, row.total_bytes)
            assert c.seq_len == (n_ctx // n_parallel if unified else n_ctx_seq)


def test_plan_np_follows_the_ubatch(default_model_path):
    """The sliding-window cache holds n_swa x n_seq_max + n_ubatch cells: -ub changes the KV cache."""
    with Model(default_model_path) as m:
        kv = {}
        for ub in (256, 512):
            (row,) = make_plan(str(default_model_path), n_ctx=4096, memory="1MiB", n_parallel=2, n_batch=ub,
                               n_ubatch=ub).rows
            with _engine(m, n_ctx=4096, n_parallel=2, n_batch=ub, n_ubatch=ub) as eng:
                assert row.kv_bytes == eng.kv_cache_bytes().total
            kv[ub] = row.kv_bytes
    assert kv[256] < kv[512]


def _serve_total(no_alloc_model, n_ctx, **flags) -> int:
    """Weights + KV + compute of the context `serve -c n_ctx` with these flags creates (as BatchedEngine
    creates it), simulated on a no_alloc model, so that large contexts cost nothing."""
    cfg = EngineConfig(model_path=str(no_alloc_model.path), n_ctx=n_ctx, **flags)
    with Context(no_alloc_model, n_ctx=cfg.n_ctx, n_batch=cfg.n_batch, n_ubatch=cfg.n_ubatch,
                 flash_attn=cfg.flash_attn, type_k=cfg.kv_cache_type_k, type_v=cfg.kv_cache_type_v,
                 n_seq_max=cfg.n_parallel, kv_unified=cfg.kv_unified) as ctx:
        return sum(r["model"] + r["context"] + r["compute"] for r in ctx.memory_breakdown())


@pytest.mark.parametrize("unified", [True, False])
def test_plan_np_answers_are_the_largest_that_fit(gqa_model_path, unified):
    budget = parse_memory("48MiB")
    plan = make_plan(str(gqa_model_path), pairs=[("f16", "f16"), ("q4_0", "q4_0")], n_ctx=3072, memory="48MiB",
                     n_parallel=3, kv_unified=unified)
    f16, q4 = plan.concurrency
    assert 0 < f16.max_seqs < q4.max_seqs < LLAMA_MAX_SEQ and f16.max_seq_len < q4.max_seq_len
    with Model(str(gqa_model_path), use_mmap=False, no_alloc=True) as m:
        for row, c in zip(plan.rows, plan.concurrency):
            total = lambda n_ctx, n_parallel=3: _serve_total(  # noqa: E731
                m, n_ctx, n_parallel=n_parallel, kv_unified=unified, kv_cache_type_k=c.type_k,
                kv_cache_type_v=c.type_v)
            # -c max_ctx -np 3 fits and the next larger -c does not
            assert total(row.max_ctx_uncapped) <= budget < total(row.max_ctx_uncapped + 1)
            assert total(c.max_seqs * c.seq_len, c.max_seqs) <= budget < total((c.max_seqs + 1) * c.seq_len,
                                                                              c.max_seqs + 1)
            assert total(3 * c.max_seq_len) <= budget < total(3 * (c.max_seq_len + GRANULE))


def test_cli_plan_np_prints_what_serve_allocates(default_model_path, tmp_path):
    """-c 4096 -np 4 printed 27.00 MiB (one sequence's context) where serve allocates 49.50 MiB; -ub reaches
    the sliding-window cache."""
    with Model(default_model_path) as m:
        for flags, cfg in [(["-np", "4"], dict(n_parallel=4)),
                           (["-np", "2", "-b", "256", "-ub", "256", "-no-kvu"],
                            dict(n_parallel=2, n_batch=256, n_ubatch=256, kv_unified=False))]:
            out = subprocess.run([*CLI, "plan", "-m", str(default_model_path), "-c", "4096", "-ctk", "f16", "-ctv",
                                  "f16", "--memory", "2GiB", "--json", *flags],
                                 capture_output=True, text=True, cwd=tmp_path, timeout=300)
            assert out.returncode == 0, out.stderr
            data = json.loads(out.stdout)
            with _engine(m, n_ctx=4096, **cfg) as eng:
                kv = eng.kv_cache_bytes().total
            assert data["rows"][0]["kv_bytes"] == data["concurrency"][0]["kv_bytes"] == kv
            assert (data["n_parallel"], data["kv_unified"]) == (cfg["n_parallel"], cfg.get("kv_unified", True))


def test_cli_plan_searches_with_the_batch_serve_would_use(default_model_path, tmp_path):
    """-c 256 fits -b / -ub to 256; the larger contexts of the search take serve's batch for their size
    (-ub 512 here), so the largest -c found is one serve can allocate in the budget."""
    out = subprocess.run([*CLI, "plan", "-m", str(default_model_path), "-c", "256", "-ctk", "f16", "--memory",
                          "1GiB", "--json"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    max_ctx = json.loads(out.stdout)["rows"][0]["max_ctx_uncapped"]
    with Model(str(default_model_path), use_mmap=False, no_alloc=True) as m:
        assert _serve_total(m, max_ctx) <= parse_memory("1GiB") < _serve_total(m, max_ctx + 1)


def test_cli_plan_np_table(gqa_model_path, tmp_path):
    out = subprocess.run([*CLI, "plan", "-m", str(gqa_model_path), "--memory", "48MiB", "-c", "3072", "-np", "3",
                          "-ctk", "q8_0"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "-np 3 (one KV pool)" in out.stdout
    assert "concurrent sequences (-c 3,072 -np 3: one KV pool shared by all sequences; 1,024 tokens each)" in out.stdout
    assert "| sequences of 1,024 tokens that fit |" in out.stdout and "longest sequence with 3 at once" in out.stdout
    bad = subprocess.run([*CLI, "plan", "-m", str(gqa_model_path), "-np", "0"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert bad.returncode == 1 and "-np" in bad.stderr and "'0'" in bad.stderr
