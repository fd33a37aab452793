"""The engine on the real default model (Gemma 3 270M Q4_K_M) on the CPU."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from pyllm._ffi import lib

from pyllm.config import EngineConfig
from pyllm.context import Context
from pyllm.engine import Engine
from pyllm.errors import ClosedError, ContextFullError, KVCacheConfigError
from pyllm.model import Model

N_CTX = 1024
PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def model(default_model_path):
    with Model(default_model_path) as m:
        yield m


def _engine(path, **kw) -> Engine:
    return Engine(EngineConfig(model_path=str(path), n_ctx=N_CTX, seed=1, **kw))


@pytest.fixture(scope="module")
def kv_bytes(model):
    out = {}
    for k, v in [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "f16")]:
        with Context(model, n_ctx=N_CTX, n_batch=512, type_k=k, type_v=v) as ctx:
            out[k, v] = ctx.kv_cache_bytes()
    return out


@pytest.mark.parametrize("k, v", [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "f16")])
def test_each_kv_pair_loads_and_generates_deterministically(default_model_path, k, v):
    with _engine(default_model_path, kv_cache_type_k=k, kv_cache_type_v=v) as engine:
        first = engine.generate(PROMPT, max_tokens=16)
        engine.context.clear()
        second = engine.generate(PROMPT, max_tokens=16)
        kv = engine.kv_cache_bytes()
    assert first.n_generated == 16 and first.stop_reason == "max_tokens"
    assert first.text.strip(), "greedy generation produced no text"
    assert first.tokens == second.tokens and first.text == second.text
    assert (kv.type_k, kv.type_v) == (k, v)


def test_kv_bytes_follow_the_block_formats(kv_bytes):
    f16 = kv_bytes["f16", "f16"].total
    assert abs(kv_bytes["q8_0", "q8_0"].total / f16 - 34 / 64) < 0.01 * 34 / 64
    assert abs(kv_bytes["q4_0", "q4_0"].total / f16 - 18 / 64) < 0.01 * 18 / 64
    mixed = kv_bytes["q8_0", "f16"]
    assert abs(mixed.k / kv_bytes["f16", "f16"].k - 34 / 64) < 0.01
    assert mixed.v == pytest.approx(kv_bytes["f16", "f16"].v, rel=0.01)


def test_kv_bytes_account_for_the_sliding_window(model):
    n_ctx = 4096
    with Context(model, n_ctx=n_ctx, n_batch=512) as ctx:
        kv = ctx.kv_cache_bytes()
    # Gemma 3 interleaves sliding-window layers: two caches, the SWA one smaller than n_ctx.
    assert len(kv.n_cells) == 2 and max(kv.n_cells) == n_ctx and min(kv.n_cells) < n_ctx
    ks, vs = model.head_sizes()
    full_formula = 2 * model.n_layer * model.n_head_kv * ks[0] * n_ctx * 2
    assert kv.total < full_formula  # a plain formula ignoring SWA would overstate it
    assert kv.devices == {"CPU": kv.total}


def test_info_log_lines(default_model_path, caplog):
    caplog.set_level(logging.INFO, logger="pyllm")
    with _engine(default_model_path, kv_cache_type_k="q8_0", kv_cache_type_v="q8_0"):
        pass
    messages = [r.getMessage() for r in caplog.records if r.name == "pyllm"]
    assert "KV cache K type set to: q8_0" in messages
    assert "KV cache V type set to: q8_0" in messages
    summary = [m for m in messages if m.startswith("flash attention:")]
    assert len(summary) == 1 and "on (requested auto)" in summary[0] and "MiB" in summary[0]


def test_no_kv_log_lines_when_types_are_not_set(default_model_path, caplog):
    caplog.set_level(logging.INFO, logger="pyllm")
    with _engine(default_model_path):
        pass
    assert not [r for r in caplog.records if "type set to" in r.getMessage()]


def test_a_plain_load_from_python_is_quiet_and_real_warnings_still_show(default_model_path, tmp_path):
    # Gemma 3's '</s>' made llama.cpp warn "control-looking token ... probably a bug in the model" on every
    # load; llama.cpp corrects the token itself, so that line is INFO now. A context past the training
    # length is a real warning: llama.cpp's own line and pyllm's reach stderr, with no logging configured.
    code = ("import sys; from pyllm import Model; from pyllm.context import Context\n"
            "m = Model(sys.argv[1]); print('loaded', file=sys.stderr, flush=True)\n"
            "Context(m, n_ctx=40960, n_batch=512).close(); m.close()")
    # cwd outside the checkout: its root would shadow the installed package (no compiled module there).
    out = subprocess.run([sys.executable, "-c", code, str(default_model_path)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    load, context = out.stderr.split("loaded\n")
    assert load == "", load
    assert "control-looking token" not in out.stderr
    assert "n_ctx_seq (40960) > n_ctx_train (32768) -- possible training context overflow" in context, context
    assert "n_ctx=40960 is larger than the 32768 tokens model" in context, context


def test_quantized_v_without_flash_attention_is_a_clean_error(model):
    with pytest.raises(KVCacheConfigError, match=r"quantized V cache \(q4_0\) requires flash attention"):
        Context(model, n_ctx=N_CTX, n_batch=512, type_k="f16", type_v="q4_0", flash_attn="off")
    # quantized K alone works without flash attention
    with Context(model, n_ctx=N_CTX, n_batch=512, type_k="q8_0", flash_attn="off") as ctx:
        assert not ctx.flash_attn


def test_prompt_too_long_raises_before_decoding(default_model_path):
    with _engine(default_model_path) as engine:
        with pytest.raises(ContextFullError, match=r"does not fit in n_ctx=1024"):
            engine.generate("word " * 2000, max_tokens=8)
        with pytest.raises(ContextFullError):
            engine.generate(PROMPT, max_tokens=N_CTX)
        assert engine.cached_tokens == []  # nothing was decoded
        assert int(lib.llama_memory_seq_pos_max(engine.context._memory, 0)) == -1


def test_use_after_close_raises(default_model_path):
    engine = _engine(default_model_path)
    ctx = engine.context
    engine.close()
    engine.close()
    with pytest.raises(ClosedError, match="context is closed"):
        ctx.kv_cache_bytes()
    with pytest.raises(ClosedError, match="model is closed"):
        engine.model.tokenize("x")
    with pytest.raises(ClosedError):
        engine.generate(PROMPT, max_tokens=2)


def test_closing_the_model_closes_its_contexts(default_model_path):
    m = Model(default_model_path)
    ctx = Context(m, n_ctx=256, n_batch=256)
    m.close()
    assert ctx.closed and m.closed


def test_streamed_pieces_equal_the_text_and_are_whole_characters(default_model_path):
    prompt = "日本の首都は東京です。日本の"
    with _engine(default_model_path) as engine:
        pieces = list(engine.stream(prompt, max_tokens=24))
        result = engine.last_result
        engine.context.clear()
        again = engine.generate(prompt, max_tokens=24)
        model = engine.model
        raw = b"".join(model.token_to_piece(t) for t in result.tokens)
    assert "".join(pieces) == result.text == again.text
    assert result.text == raw.decode("utf-8", "replace")
    assert any(ord(ch) > 0x7F for ch in result.text), result.text  # the test really exercised multi-byte text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_strings_and_eog(default_model_path):
    with _engine(default_model_path) as engine:
        full = engine.generate(PROMPT, max_tokens=16)
        word = full.text.split()[1]
        cut = engine.generate(PROMPT, max_tokens=16, stop=[word])
    assert cut.stop_reason == "stop"
    assert cut.text == full.text[: full.text.index(word)]


def test_prefix_reuse_gives_the_same_tokens(default_model_path):
    with _engine(default_model_path) as engine:
        a = engine.generate(PROMPT, max_tokens=8)
        b = engine.generate(PROMPT, max_tokens=8)  # reuses the cached prompt when the cache allows
        engine.context.clear()
        c = engine.generate(PROMPT, max_tokens=8)
    assert a.tokens == b.tokens == c.tokens


def test_sampling_is_seeded(default_model_path):
    from pyllm.sampling import SamplingParams

    sp = SamplingParams(temperature=0.9, seed=1234)
    with _engine(default_model_path) as engine:
        a = engine.generate(PROMPT, max_tokens=12, sampling=sp)
        engine.context.clear()
        b = engine.generate(PROMPT, max_tokens=12, sampling=sp)
    assert a.tokens == b.tokens


def test_wrapping_handles_created_elsewhere_does_not_take_ownership(model):
    import pyllm

    borrowed = Model.from_address(model.address)
    assert not borrowed.owned and borrowed.n_layer == model.n_layer
    with Context(model, n_ctx=256, n_batch=256) as owner:
        view = Context.from_address(borrowed, owner.address)
        view.decode(model.tokenize("Hello"))
        assert owner.n_past == 0 and view.n_past > 0  # both wrap one llama_context
        view.close()
        borrowed.close()
        assert not owner.closed and not model.closed  # nothing was freed by the borrowers
        owner.clear()
        owner.decode(model.tokenize("Hello"))
    assert pyllm.build_info()["version"] == pyllm.VERSION and pyllm.Engine is Engine


def test_synthetic_model_with_a_realistic_vocabulary(synthetic, tmp_path):
    # The GPU check's model option: a 32,000-entry vocabulary, so the output layer, the per-token
    # logits and the greedy argmax are sized like a real model's.
    path = synthetic.write_llama(tmp_path / "vocab32k.gguf", n_embd=64, n_layer=2, n_head=4, n_head_kv=2,
                                 n_ff=128, n_vocab=32000)
    with Model(path) as m:
        assert m.n_vocab == 32000
        assert m.detokenize(m.tokenize("hello, world", add_special=False)) == "hello, world"
        cfg = EngineConfig(model_path=str(path), n_ctx=256, n_threads=2)
        with Engine(cfg, model=m) as engine:
            a = engine.generate("hello", max_tokens=16, ignore_eos=True)
            engine.reset()
            b = engine.generate("hello", max_tokens=16, ignore_eos=True)
    assert a.tokens == b.tokens and len(a.tokens) == 16 and all(0 <= t < 32000 for t in a.tokens)
    assert any(t >= 259 for t in a.tokens)  # the padded entries take part in the argmax


def test_ingest_may_fill_the_context_but_generation_needs_a_cell(default_model_path):
    with _engine(default_model_path) as engine:
        tokens = [1000 + i for i in range(N_CTX)]
        assert engine.ingest(tokens) == N_CTX
        with pytest.raises(ContextFullError, match=f"prompt of {N_CTX} tokens"):
            engine.generate(tokens, max_tokens=1)
