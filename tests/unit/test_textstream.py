"""Incremental UTF-8 assembly and stop strings, independent of any model."""
from __future__ import annotations

from hypothesis import given, strategies as st

from pyllm.textstream import TextStream


def _run(chunks, stops=()):
    ts = TextStream(stops)
    out = [ts.feed(c) for c in chunks]
    out.append(ts.finish())
    return "".join(out), ts.stopped


def test_multibyte_split_across_tokens():
    data = "é🦙日".encode()
    chunks = [data[i:i + 1] for i in range(len(data))]
    ts = TextStream()
    emitted = [ts.feed(c) for c in chunks]
    assert "".join(emitted) + ts.finish() == "é🦙日"
    assert all(e == "" or e in ("é", "🦙", "日") for e in emitted)  # never half a character


def test_stop_string_spanning_tokens_is_cut_and_not_emitted():
    text, stopped = _run([b"Hello ", b"wor", b"ld! END", b"MORE"], stops=["ld! E"])
    assert stopped and text == "Hello wor"


def test_incomplete_tail_becomes_replacement_char():
    assert _run([b"ok", "🦙".encode()[:2]])[0] == "ok\ufffd"


@given(st.text(max_size=200), st.lists(st.integers(min_value=1, max_value=7), max_size=80))
def test_arbitrary_byte_splits_reassemble_exactly(text, cuts):
    data = text.encode("utf-8")
    chunks, i = [], 0
    for c in cuts:
        chunks.append(data[i:i + c])
        i += c
    chunks.append(data[i:])
    assert _run(chunks)[0] == text


@given(st.text(max_size=120), st.text(min_size=1, max_size=6))
def test_stop_string_output_is_the_prefix_before_its_first_occurrence(text, stop):
    data = text.encode("utf-8")
    chunks = [data[i:i + 3] for i in range(0, len(data), 3)]
    out, stopped = _run(chunks, stops=[stop])
    if stop in text:
        assert stopped and out == text[: text.index(stop)]
    else:
        assert not stopped and out == text
