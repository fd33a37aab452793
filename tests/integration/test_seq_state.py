"""One sequence's KV state on the default model: take it, restore it, save it to a file, refuse bad ones."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pyllm import seqstate
from pyllm._ffi import lib
from pyllm.context import Context
from pyllm.errors import ClosedError, IncompatibleStateError, SequenceStateError
from pyllm.kvtypes import block_size, parse_kv_cache_type, type_size
from pyllm.model import Model
from pyllm.seqstate import load_sequence_file, read_state_file_header, save_sequence_file

HERE = Path(__file__).resolve().parent
PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"


@pytest.fixture(scope="module")
def model(default_model_path):
    with Model(default_model_path) as m:
        yield m


def _ctx(model, **kw) -> Context:
    kw = {"n_ctx": 1024, "n_batch": 512, "n_seq_max": 2, **kw}
    return Context(model, **kw)


def _next_logits(ctx: Context, token: int) -> np.ndarray:
    ctx.decode([token])
    return ctx.logits().copy()


@pytest.mark.parametrize("k, v", [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "f16")])
def test_a_restored_sequence_continues_exactly_as_the_original(model, k, v):
    toks = model.tokenize(PROMPT)
    with _ctx(model, type_k=k, type_v=v) as a, _ctx(model, type_k=k, type_v=v) as b:
        a.decode(toks)
        state = a.seq_state_get(0)
        assert isinstance(state, bytes) and len(state) == a.seq_state_size(0)
        assert b.seq_state_set(state, 0) == len(toks) and b.n_past == len(toks)
        assert b.seq_pos_range(0) == (0, len(toks) - 1)
        nxt = model.tokenize(" Rome", add_special=False)[0]
        np.testing.assert_array_equal(_next_logits(a, nxt), _next_logits(b, nxt))  # bit for bit
        # into the other sequence of the same context too
        assert a.seq_state_set(state, 1) == len(toks) and a.seq_pos_range(1) == (0, len(toks) - 1)


def test_past_the_sliding_window_the_state_holds_the_window(model):
    """Gemma 3 keeps 512-token windows in 5 of 6 layers: a 700-token state omits the sliding-window cells the
    window left behind (positions 0..187), and what it holds restores exactly: the restored context's own state
    is the same bytes, and a third context restored from it continues bit for bit like the second. (The first
    context's next logits differ slightly from the restored ones: its window cells sit at other cache indices,
    so attention sums them in another order; on this model that moves logits by up to ~1, as another batch
    shape does, and the greedy token stays the same.)"""
    toks = (model.tokenize("Once upon a time there was a little fox who lived in the forest. ") * 60)[:700]
    with _ctx(model, n_ctx=1024) as a, _ctx(model, n_ctx=1024) as b, _ctx(model, n_ctx=1024) as c:
        a.decode(toks)
        state = a.seq_state_get(0)
        assert b.seq_state_set(state, 0) == 700 and b.seq_pos_range(0) == (188, 699)   # the window's start
        assert b.seq_state_get(0) == state
        assert c.seq_state_set(b.seq_state_get(0), 0) == 700
        lb, lc, la = _next_logits(b, toks[5]), _next_logits(c, toks[5]), _next_logits(a, toks[5])
        np.testing.assert_array_equal(lb, lc)
        assert int(np.argmax(la)) == int(np.argmax(lb))


def test_bytes_per_token_are_llama_cpps_rows_plus_cell_metadata(model):
    """Within the window every layer stores a K and a V row per token: 2 x n_layer x row bytes, plus 12 bytes of
    cell metadata (position, sequence count, sequence id) in each of the two caches (global and sliding)."""
    heads_k, _ = model.head_sizes()
    for name in ("f16", "q8_0", "q4_0"):
        t = parse_kv_cache_type(name)
        row = model.n_head_kv * heads_k[0] * type_size(t) // block_size(t)
        more = (model.tokenize(PROMPT, add_special=False) * 3)[:30]
        with _ctx(model, type_k=name, type_v=name) as ctx:
            ctx.decode(model.tokenize(PROMPT)[:10])
            s10 = ctx.seq_state_size(0)
            ctx.decode(more)
            s40 = ctx.seq_state_size(0)
        assert len(more) == 30 and (s40 - s10) / 30 == 2 * model.n_layer * row + 2 * 12


def test_arguments_are_checked_before_c(model):
    with _ctx(model) as ctx:
        ctx.decode(model.tokenize(PROMPT))
        for bad in (-1, 2, 256, True, "0", 1.0):
            with pytest.raises(SequenceStateError, match="seq_id=.* out of range; this context holds n_seq_max=2"):
                ctx.seq_state_size(bad)
        with pytest.raises(SequenceStateError, match="ON_DEVICE is refused"):
            ctx.seq_state_get(0, int(lib.LLAMA_STATE_SEQ_FLAGS_ON_DEVICE))
        with pytest.raises(SequenceStateError, match="ON_DEVICE is refused"):
            ctx.seq_state_set(b"x" * 64, 0, int(lib.LLAMA_STATE_SEQ_FLAGS_ON_DEVICE))
        with pytest.raises(SequenceStateError, match="flags=8 is not"):
            ctx.seq_state_get(0, 8)
        good = ctx.seq_state_get(0)
        with pytest.raises(SequenceStateError, match="empty"):
            ctx.seq_state_set(b"", 1)
        with pytest.raises(SequenceStateError, match="bytes-like"):
            ctx.seq_state_set(good.hex(), 1)
        with pytest.raises(SequenceStateError, match="truncated: 5 bytes"):
            ctx.seq_state_set(good[:5], 1)
        with pytest.raises(SequenceStateError, match="magic 0x00000000"):
            ctx.seq_state_set(bytes(len(good)), 1)
        with pytest.raises(SequenceStateError, match="saved sequence id 300"):
            ctx.seq_state_set(good[:4] + (300).to_bytes(4, "little") + good[8:], 1)
        assert ctx.seq_state_set(memoryview(bytearray(good)), 1) > 0     # any bytes-like object
    with pytest.raises(ClosedError):
        ctx.seq_state_get(0)
    with pytest.raises(ClosedError):
        ctx.seq_state_set(good, 0)


def test_llama_cpp_refusals_raise_and_leave_the_sequence_empty(model):
    toks = model.tokenize(PROMPT)
    with _ctx(model, type_k="q8_0", type_v="q8_0") as q8, _ctx(model) as f16, \
            _ctx(model, flash_attn="off") as no_fa, _ctx(model, kv_unified=False) as split:
        for ctx in (q8, f16, no_fa, split):
            ctx.decode(toks)
        cases = [(q8.seq_state_get(0), f16, "mismatched key type"),
                 (no_fa.seq_state_get(0), f16, "incompatible V transposition"),
                 (split.seq_state_get(0), f16, "n_stream mismatch")]
        for state, ctx, why in cases:
            with pytest.raises(SequenceStateError, match=f"which is now empty: .*{why}"):
                ctx.seq_state_set(state, 0)
            assert ctx.seq_pos_range(0) == (-1, -1) and ctx.n_past == 0
            ctx.decode(toks)


def test_truncated_or_extended_states_are_refused_before_c(model):
    toks = model.tokenize(PROMPT)
    with _ctx(model, type_k="q8_0", type_v="q8_0") as q8:
        q8.decode(toks)
        state = q8.seq_state_get(0)
        for bad, why in ((state[:-100], "truncated in the V rows"), (state + b"\0\0", "truncated at byte"),
                         (state[:8] + b"\xff" * 4 + state[12:], "KV streams")):
            with pytest.raises(SequenceStateError, match=f"corrupt sequence state .*{why}"):
                q8.seq_state_set(bad, 0)
            assert q8.seq_pos_range(0) == (0, len(toks) - 1)          # untouched
        assert q8.seq_state_set(state, 0) == len(toks)


def test_a_state_needs_free_cells(model):
    """A state that does not fit the context is refused by llama.cpp ('failed to find ... cells')."""
    toks = (model.tokenize("A long prompt. ") * 80)[:300]
    with Context(model, n_ctx=512, n_batch=512) as big, Context(model, n_ctx=256, n_batch=256) as small:
        big.decode(toks)
        with pytest.raises(SequenceStateError, match="cells"):
            small.seq_state_set(big.seq_state_get(0), 0)


@pytest.mark.slow
def test_truncated_and_corrupted_states_never_abort(default_model_path):
    """Thousands of truncated and byte-corrupted states, in a child process: each is refused (by pyllm's walk of
    the layout or by llama.cpp) or loads, and the process never aborts; a loaded one still decodes, one llama.cpp
    refused leaves the sequence empty. (The layout walk does not depend on the KV type; run the script with
    q4_0 q4_0 for the quantized rows.)"""
    out = subprocess.run([sys.executable, str(HERE / "seq_state_fuzz.py"), str(default_model_path), "f16", "f16"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"exit {out.returncode} (negative: killed by a signal)\n{out.stderr[-3000:]}"
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["tried"] > 5000 and counts["refused"] + counts["accepted"] == counts["tried"]
    assert counts["refused_by_llama"] > 300           # what passes pyllm's walk of the layout reaches llama.cpp
    assert counts["accepted_decoded"] == counts["accepted"]


# ---- state files ----
def test_save_and_load_a_file_round_trip(model, tmp_path):
    toks = model.tokenize(PROMPT)
    path = tmp_path / "chat.bin"
    with _ctx(model, type_k="q8_0", type_v="q8_0") as a, _ctx(model, type_k="q8_0", type_v="q8_0") as b:
        a.decode(toks)
        header = save_sequence_file(a, 0, toks, path)
        assert header.n_tokens == len(toks) and header.type_k == "q8_0" and not header.v_trans
        assert read_state_file_header(path) == header
        assert path.stat().st_size == 48 + len(json.dumps(
            __import__("dataclasses").asdict(header), sort_keys=True)) + 4 * len(toks) + header.state_bytes
        assert [p.name for p in tmp_path.iterdir()] == ["chat.bin"]       # no temporary file left
        assert load_sequence_file(b, 1, path) == toks
        assert b.seq_pos_range(1) == (0, len(toks) - 1)
        assert load_sequence_file(b, 0, path) == toks and b.n_past == len(toks)
        nxt = toks[3]
        np.testing.assert_array_equal(_next_logits(a, nxt), _next_logits(b, nxt))


def test_tokens_must_describe_the_sequence(model, tmp_path):
    toks = model.tokenize(PROMPT)
    with _ctx(model) as ctx:
        ctx.decode(toks)
        with pytest.raises(SequenceStateError, match=r"\d+ tokens given for sequence 0, which holds positions 0"):
            save_sequence_file(ctx, 0, toks[:-1], tmp_path / "a.bin")
        with pytest.raises(SequenceStateError, match="outside the vocabulary"):
            save_sequence_file(ctx, 0, toks[:-1] + [model.n_vocab], tmp_path / "a.bin")
        assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """A q8_0 state file of the prompt, and its tokens."""
    toks = model.tokenize(PROMPT)
    path = tmp_path_factory.mktemp("state") / "saved.bin"
    with _ctx(model, type_k="q8_0", type_v="q8_0") as ctx:
        ctx.decode(toks)
        save_sequence_file(ctx, 0, toks, path)
    return path, toks


def _untouched_after(ctx: Context, call) -> None:
    """``call`` raises, and sequence 0 of ``ctx`` still holds what it held."""
    before = ctx.seq_pos_range(0), ctx.n_past
    with pytest.raises(SequenceStateError) as info:
        call()
    assert (ctx.seq_pos_range(0), ctx.n_past) == before
    return info.value


@pytest.mark.parametrize("kw, why", [
    ({"type_k": "f16", "type_v": "f16"}, "KV cache K q8_0 / V q8_0, this context has K f16 / V f16"),
    ({"type_k": "q8_0", "type_v": "f16", "flash_attn": "off"}, "saved with flash attention on (V not transposed)"),
    ({"type_k": "q8_0", "type_v": "q8_0", "kv_unified": False}, "1 KV stream(s), this one has 2"),
])
def test_a_file_for_another_kv_layout_is_refused_before_c(model, saved, kw, why):
    path, toks = saved
    with _ctx(model, **kw) as ctx:
        ctx.decode(toks[:4])
        err = _untouched_after(ctx, lambda: load_sequence_file(ctx, 0, path))
        assert isinstance(err, IncompatibleStateError) and why in str(err)


def test_a_file_for_another_model_is_refused(saved, gqa_model_path):
    path, _ = saved
    with Model(gqa_model_path) as other, Context(other, n_ctx=512, n_batch=512, type_k="q8_0",
                                                  type_v="q8_0") as ctx:
        ctx.decode([1, 2, 3])
        err = _untouched_after(ctx, lambda: load_sequence_file(ctx, 0, path))
        assert isinstance(err, IncompatibleStateError) and "model fingerprints differ" in str(err)
        assert "gemma-3-270m" in str(err)


def test_a_file_from_another_build_is_refused(model, saved, monkeypatch):
    path, toks = saved
    monkeypatch.setattr(seqstate, "_build", lambda: {"pyllm_version": "9.9.9", "llama_cpp_commit": "deadbeef"})
    with _ctx(model, type_k="q8_0", type_v="q8_0") as ctx:
        err = _untouched_after(ctx, lambda: load_sequence_file(ctx, 0, path))
        assert isinstance(err, IncompatibleStateError) and "this is pyllm 9.9.9 with llama.cpp deadbeef" in str(err)


def test_a_sequence_too_long_for_the_context_is_refused(model, saved):
    path, toks = saved
    # A file announcing more tokens than n_ctx_seq: rewrite the header consistently (checksums included).
    big = _rewrite(path, path.with_name("big.bin"), n_tokens=600, extra_tokens=[5] * (600 - len(toks)))
    with Context(model, n_ctx=512, n_batch=512, type_k="q8_0", type_v="q8_0") as ctx:
        err = _untouched_after(ctx, lambda: load_sequence_file(ctx, 0, big))
        assert "more than the 512 positions" in str(err)


def _rewrite(src: Path, dst: Path, *, extra_tokens=(), **changes) -> Path:
    """A copy of a state file with header fields changed and the checksums recomputed (a file a buggy or
    malicious writer could produce that passes the integrity checks)."""
    import dataclasses
    import hashlib
    import struct

    raw = src.read_bytes()
    hlen = struct.unpack_from("<I", raw, 12)[0]
    header = json.loads(raw[16:16 + hlen])
    at = 16 + hlen + 32
    tokens = raw[at:at + 4 * header["n_tokens"]] + b"".join(struct.pack("<i", t) for t in extra_tokens)
    state = raw[at + 4 * header["n_tokens"]:]
    header.update(changes)
    header["payload_sha256"] = hashlib.sha256(tokens + state).hexdigest()
    head = json.dumps(header, sort_keys=True).encode()
    dst.write_bytes(raw[:12] + struct.pack("<I", len(head)) + head + hashlib.sha256(head).digest() + tokens + state)
    assert dataclasses.asdict(read_state_file_header(dst))["n_tokens"] == header["n_tokens"]
    return dst


def test_truncated_and_corrupt_files_are_refused_before_c(model, saved, tmp_path):
    path, toks = saved
    raw = path.read_bytes()
    hlen = int.from_bytes(raw[12:16], "little")
    cases = {
        "truncated": [raw[:n] for n in (0, 7, 16, 16 + hlen // 2, 16 + hlen + 10, 48 + hlen + 3, len(raw) - 1)],
        "trailing bytes": [raw + b"\0"],
        "checksum does not match": [raw[:20] + bytes([raw[20] ^ 1]) + raw[21:]],
        "do not match their SHA-256": [raw[:n] + bytes([raw[n] ^ 0x40]) + raw[n + 1:]
                                       for n in (48 + hlen, 48 + hlen + 4 * len(toks) + 9, len(raw) - 1)],
    }
    with _ctx(model, type_k="q8_0", type_v="q8_0") as ctx:
        ctx.decode(toks[:4])
        for why, contents in cases.items():
            for i, content in enumerate(contents):
                p = tmp_path / f"bad{i}.bin"
                p.write_bytes(content)
                err = _untouched_after(ctx, lambda: load_sequence_file(ctx, 0, p))
                assert why in str(err) or (why == "truncated" and "empty" in str(err)), (why, i, str(err))
        # token ids outside the vocabulary, with consistent checksums: refused before C as well
        bad = _rewrite(path, tmp_path / "badtok.bin", n_tokens=len(toks) + 1, extra_tokens=[model.n_vocab + 7])
        err = _untouched_after(ctx, lambda: load_sequence_file(ctx, 0, bad))
        assert "outside the vocabulary" in str(err)
        missing = _untouched_after(ctx, lambda: load_sequence_file(ctx, 0, tmp_path / "missing.bin"))
        assert "No such file" in str(missing)


def test_a_failed_save_leaves_the_old_file_and_no_temporary(model, saved, tmp_path, monkeypatch):
    path, toks = saved
    target = tmp_path / "keep.bin"
    target.write_bytes(path.read_bytes())
    before = target.read_bytes()

    def interrupted(fd):
        raise KeyboardInterrupt

    with _ctx(model, type_k="q8_0", type_v="q8_0") as ctx:
        ctx.decode(toks + toks[1:5])
        monkeypatch.setattr(os, "fsync", interrupted)
        with pytest.raises(KeyboardInterrupt):
            save_sequence_file(ctx, 0, toks + toks[1:5], target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.bin"]


_SAVER = """
import sys
from pyllm.context import Context
from pyllm.model import Model
from pyllm.seqstate import save_sequence_file
with Model(sys.argv[1]) as m, Context(m, n_ctx=2048, n_batch=2048) as ctx:
    toks = (m.tokenize("Once upon a time, in a quiet village by the sea. ") * 200)[:1500]
    ctx.decode(toks)
    i = 0
    while True:
        save_sequence_file(ctx, 0, toks, sys.argv[2])
        i += 1
        print(i, flush=True)
"""


@pytest.mark.slow
def test_sigterm_while_saving_never_leaves_a_half_written_file(default_model_path, model, tmp_path):
    """A process saving a 1500-token state in a loop is killed by SIGTERM at several moments: whatever is at the
    file's name is always a whole file that loads."""
    target = tmp_path / "s.bin"
    for delay in (0.0, 0.013, 0.029, 0.047, 0.071):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(default_model_path), str(target)],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "1"
            time.sleep(delay)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == -signal.SIGTERM
        finally:
            proc.kill()
            proc.stdout.close()
        header = read_state_file_header(target)
        with Context(model, n_ctx=2048, n_batch=2048) as ctx:
            assert len(load_sequence_file(ctx, 0, target)) == header.n_tokens == 1500
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "s.bin"]
    assert all(n.startswith(".s.bin.") and n.endswith(".tmp") for n in leftovers)


def test_model_fingerprint_is_stable_and_cached(model, gqa_model_path, tmp_path):
    fp = seqstate.model_fingerprint(model)
    assert fp == seqstate.model_fingerprint(model) and len(fp) == 64
    with Model(gqa_model_path) as other:
        assert seqstate.model_fingerprint(other) != fp
