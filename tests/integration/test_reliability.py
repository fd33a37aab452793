"""Failure behaviour: bad files, bad parameters, interruption, resources, full contexts.

Everything that could take the process down runs in a child process first where a crash would
be invisible otherwise; the rest runs in-process (a native abort would kill pytest itself).
"""
from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from pyllm._ffi import lib
from pyllm.config import EngineConfig
from pyllm.context import ConcurrentUseError, Context
from pyllm.engine import Engine
from pyllm.errors import (ConfigError, ContextError, ContextFullError, ModelLoadError, TokenizeError,
                          VocabOnlyError)
from pyllm.model import Model
from pyllm.sampling import SamplingParams

CLI = [sys.executable, "-c", "import sys; from pyllm.cli import main; sys.exit(main())"]


def _bad_files(tmp_path, model_path, synthetic):
    data = model_path.read_bytes()
    files = {
        "missing": (tmp_path / "nope.gguf", "model file not found"),
        "directory": (tmp_path, "is a directory"),
        "empty": (tmp_path / "empty.gguf", "is empty"),
        "not GGUF": (tmp_path / "garbage.gguf", "not a GGUF file"),
        "truncated header": (tmp_path / "trunc_meta.gguf", "failed to read key-value pairs"),
        "truncated data": (tmp_path / "trunc_data.gguf", "not within the file bounds"),
        "bad version": (tmp_path / "version.gguf", "only supports up to version 3"),
        "bad tensor count": (tmp_path / "count.gguf", "number of tensors"),
        "unknown architecture": (tmp_path / "arch.gguf", "unknown model architecture: 'notanarch'"),
    }
    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "garbage.gguf").write_bytes(os.urandom(4096))
    (tmp_path / "trunc_meta.gguf").write_bytes(data[:1_000_000])
    (tmp_path / "trunc_data.gguf").write_bytes(data[: len(data) * 3 // 4])
    (tmp_path / "version.gguf").write_bytes(data[:4] + b"\xff\xff\xff\xff" + data[8:2_000_000])
    (tmp_path / "count.gguf").write_bytes(data[:8] + b"\xff" * 7 + b"\x0f" + data[16:2_000_000])
    gguf = synthetic._gguf()
    import numpy as np
    w = gguf.GGUFWriter(str(tmp_path / "arch.gguf"), "notanarch")
    w.add_block_count(1)
    w.add_tensor("x.weight", np.zeros(4, np.float32))
    synthetic._finish(w)
    return files


def test_bad_model_files_raise_model_load_error(tmp_path, default_model_path, synthetic):
    for name, (path, reason) in _bad_files(tmp_path, default_model_path, synthetic).items():
        with pytest.raises(ModelLoadError) as info:
            Model(path)
        msg = str(info.value)
        assert str(path) in msg and reason in msg, (name, msg)
        assert isinstance(info.value, OSError)


def test_cli_prints_one_line_for_a_bad_model(tmp_path, default_model_path, synthetic):
    for name, (path, reason) in _bad_files(tmp_path, default_model_path, synthetic).items():
        out = subprocess.run(CLI + ["generate", "hi", "-m", str(path), "-n", "1"], capture_output=True, text=True,
                             cwd=tmp_path, timeout=120)
        assert out.returncode == 1, (name, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pyllm: error: ") and reason in lines[0], (name, out.stderr)
        assert "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def model(default_model_path):
    with Model(default_model_path) as m:
        yield m


@pytest.fixture(scope="module")
def engine(model, default_model_path):
    with Engine(EngineConfig(model_path=str(default_model_path), n_ctx=512, seed=3), model=model) as e:
        yield e


def test_bad_parameters_are_specific_errors(model, engine):
    # One rule, one class: the same ConfigError whether EngineConfig or Context checks it.
    with pytest.raises(ConfigError, match="n_ctx=-5 is out of range"):
        Context(model, n_ctx=-5)
    for make in (lambda: Context(model, n_ctx=256, n_batch=256, n_threads=0), lambda: EngineConfig(n_threads=0)):
        with pytest.raises(ConfigError, match=r"^n_threads=0 is out of range; expected an integer in \[1, 1024\]"):
            make()
    with pytest.raises(ContextError, match=r"needs at least .* GiB of KV cache, more than the .* available"):
        Context(model, n_ctx=2**31 - 1, n_batch=512)
    with pytest.raises(ConfigError, match="n_batch=1024 is larger than n_ctx=512"):
        EngineConfig(n_ctx=512, n_batch=1024)
    with pytest.raises(ConfigError, match="prompt is empty"):
        engine.generate("", max_tokens=4)
    with pytest.raises(TokenizeError, match="lone surrogate"):
        engine.generate("bad \udcff", max_tokens=4)
    with pytest.raises(ContextFullError, match="max_tokens=1000000000"):
        engine.generate("hi", max_tokens=10**9)
    with pytest.raises(ConfigError, match="max_tokens=-1 is out of range"):
        engine.generate("hi", max_tokens=-1)
    with pytest.raises(ConfigError, match="temperature=-1"):
        SamplingParams(temperature=-1)
    with pytest.raises(ConfigError, match="top_p=nan"):
        SamplingParams(top_p=float("nan"))
    with pytest.raises(ConfigError, match="seed=-3"):
        SamplingParams(seed=-3)
    assert engine.generate("NUL\x00byte", max_tokens=2).n_generated == 2


def test_out_of_vocabulary_tokens_never_reach_llama_decode(engine):
    ctx = engine.context
    before = ctx.n_past
    for bad in ([-1], [engine.model.n_vocab], [1, 2, 2**31 - 1]):
        with pytest.raises(TokenizeError, match="outside the vocabulary"):
            ctx.decode(bad)
    with pytest.raises(TokenizeError):
        ctx.decode_one(engine.model.n_vocab + 5)
    with pytest.raises(TokenizeError):
        engine.generate([engine.model.n_vocab], max_tokens=1)
    assert ctx.n_past == before


def test_context_full_stops_cleanly(model, default_model_path):
    with Engine(EngineConfig(model_path=str(default_model_path), n_ctx=256), model=model) as e:
        n_ctx = e.context.n_ctx
        r = e.generate("Count: one two three", max_tokens=None, ignore_eos=True)
        assert r.stop_reason == "context_full"
        assert r.n_prompt + r.n_generated == n_ctx + 1  # the last token is sampled, never decoded
        assert len(e.cached_tokens) == n_ctx == _cells(e)
        again = e.generate("Count: one two", max_tokens=4)  # usable afterwards
        assert again.n_generated == 4


def _send_sigint_after(delay: float, sent: list) -> threading.Timer:
    def send() -> None:
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(delay, send)
    timer.start()
    return timer


def test_ctrl_c_during_generation_stops_and_keeps_the_text(engine, sigint_raises):
    engine.reset()
    timers = []
    with pytest.raises(KeyboardInterrupt):
        for piece in engine.stream("Write a long story about a lighthouse keeper.", max_tokens=400, ignore_eos=True):
            if not timers:  # generation has begun: the signal lands in the decode loop, not the prompt
                timers.append(_send_sigint_after(0.3, []))
    timers[0].cancel()
    result = engine.last_result
    assert result.stop_reason == "interrupted"
    assert 0 < result.n_generated < 400 and result.text
    assert result.text == engine.model.detokenize(result.tokens).lstrip() or result.text in engine.model.detokenize(result.tokens)
    # The signal lands between tokens or inside a decode: the interrupted reply's cells are freed, and the
    # engine's record of the cache agrees with llama.cpp's.
    assert engine.cached_tokens == [] and _cells(engine) == 0
    follow = engine.generate("The capital of France is", max_tokens=8)
    engine.reset()
    fresh = engine.generate("The capital of France is", max_tokens=8)
    assert follow.tokens == fresh.tokens  # the context is usable and consistent


def test_ctrl_c_during_prompt_ingestion_aborts_within_a_step(model, default_model_path, sigint_raises):
    with Engine(EngineConfig(model_path=str(default_model_path), n_ctx=4096, n_batch=4096, n_ubatch=256),
                model=model) as e:
        prompt = list(range(1000, 4000))  # 3000 tokens: several seconds of prompt processing
        sent: list[float] = []
        timer = _send_sigint_after(0.5, sent)
        with pytest.raises(KeyboardInterrupt):
            e.generate(prompt, max_tokens=1)
            time.sleep(5)  # the interrupt must arrive during the decode, not here
        elapsed = time.perf_counter() - sent[0]
        timer.cancel()
        assert elapsed < 2.5, f"took {elapsed:.2f}s to stop"
        assert e.last_result.stop_reason == "interrupted"
        assert _cells(e) == 0 and e.cached_tokens == []  # what the aborted decode left is freed
        r = e.generate("Hello", max_tokens=3)  # usable afterwards
        assert r.n_generated == 3


def test_closing_a_stream_early_keeps_the_text(engine):
    engine.reset()
    gen = engine.stream("Once upon a time", max_tokens=50, ignore_eos=True)
    pieces = [next(gen) for _ in range(3)]
    gen.close()
    result = engine.last_result
    assert result.stop_reason == "cancelled" and result.text.startswith("".join(pieces))
    # what was decoded stays cached for the next prompt (the last token was sampled, never decoded)
    assert len(engine.cached_tokens) == result.n_prompt + result.n_generated - 1 == _cells(engine)


def test_exception_in_a_python_callback_is_reraised_after_c_returns(default_model_path):
    calls = []

    def progress(fraction):
        calls.append(fraction)
        if fraction > 0.2:
            raise RuntimeError("stop loading, from the callback")

    with pytest.raises(RuntimeError, match="stop loading, from the callback"):
        Model(default_model_path, use_mmap=False, progress=progress)
    assert calls and calls[-1] > 0.2
    with pytest.raises(ModelLoadError, match="cancelled by the progress callback"):
        Model(default_model_path, use_mmap=False, progress=lambda f: f < 0.5)


def test_two_threads_two_contexts_work(model):
    out = {}

    def run(name):
        with Context(model, n_ctx=256, n_batch=256) as ctx:
            ctx.decode(model.tokenize("The capital of France is"))
            toks = []
            for _ in range(8):
                t = ctx.argmax()
                toks.append(t)
                ctx.decode_one(t)
            out[name] = toks

    threads = [threading.Thread(target=run, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert out["a"] == out["b"] and len(out["a"]) == 8


def test_two_threads_one_context_get_a_clear_error(model):
    ctx = Context(model, n_ctx=4096, n_batch=4096, n_ubatch=512)
    started = threading.Event()
    errors = []

    def long_decode():
        started.set()
        ctx.decode(list(range(1000, 3000)))

    t = threading.Thread(target=long_decode)
    t.start()
    started.wait()
    time.sleep(0.3)
    try:
        ctx.decode([1000])
    except ConcurrentUseError as exc:
        errors.append(exc)
    t.join(120)
    assert errors and "in use by another thread" in str(errors[0])
    assert ctx.n_past == 2000  # the first thread's work is intact
    ctx.close()


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_load_and_free_200_times_leaves_memory_flat(default_model_path):
    def cycle():
        with Model(default_model_path) as m, Context(m, n_ctx=256, n_batch=256) as c:
            c.decode(m.tokenize("hello"))

    for _ in range(10):  # warm up allocator pools and caches
        cycle()
    gc.collect()
    base = _rss()
    for _ in range(200):
        cycle()
    gc.collect()
    grown = _rss() - base
    print(f"RSS growth over 200 load/free cycles: {grown / 2**20:.1f} MiB")
    assert grown < 32 * 2**20


@pytest.mark.slow
def test_1000_short_generations_keep_the_cache_clean(engine):
    engine.reset()
    first = engine.generate("Hi there", max_tokens=2)
    for i in range(1000):
        r = engine.generate("Hi there", max_tokens=2)
        assert r.tokens == first.tokens, i
        # the cache holds exactly the prompt and the decoded generated tokens, nothing stale
        assert len(engine.cached_tokens) == r.n_prompt + r.n_generated - 1 == _cells(engine)
    assert len(engine.cached_tokens) < 16


def test_vocab_only_model_is_refused_where_llama_cpp_would_abort(vocab_spm):
    with Model(vocab_spm, vocab_only=True) as m:
        with pytest.raises(VocabOnlyError):
            m.head_sizes()
        with pytest.raises(ContextError, match="vocab_only"):
            Context(m)


def _cells(engine) -> int:
    """Cells of sequence 0 as llama.cpp's memory reports them."""
    return int(lib.llama_memory_seq_pos_max(engine.context._memory, 0)) + 1
