"""Tokenization on llama.cpp's own vocab-only GGUFs (no weights needed)."""
from __future__ import annotations

import pytest

from pyllm.context import Context
from pyllm.errors import ClosedError, ContextError, TokenizeError
from pyllm.model import Model

TEXTS = [
    "Hello world",
    "Grüße aus Köln, naïve café",
    "日本語のテキストと中文",
    "emoji: 🦙🚀 and combining: e\u0301",
    "  leading spaces and\ttabs\nnewlines  ",
]


@pytest.fixture(scope="module", params=["spm", "bpe"])
def vocab_model(request, vocab_spm, vocab_bpe):
    with Model(vocab_spm if request.param == "spm" else vocab_bpe, vocab_only=True) as model:
        yield model


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(vocab_model, text):
    tokens = vocab_model.tokenize(text, add_special=False)
    assert tokens and all(0 <= t < vocab_model.n_vocab for t in tokens)
    assert vocab_model.detokenize(tokens) in (text, " " + text)  # SPM may add a leading space
    pieces = b"".join(vocab_model.token_to_piece(t) for t in tokens).decode("utf-8")
    assert pieces.lstrip(" ") == text.lstrip(" ") or pieces == text


def test_text_longer_than_the_first_buffer_guess(vocab_model):
    # Characters that expand to more tokens than bytes/char guesses (byte fallback on rare CJK).
    text = "鿐鿑鿒鿓" * 3000 + "x" * 10000
    tokens = vocab_model.tokenize(text, add_special=True)
    assert len(tokens) > 10000
    assert vocab_model.detokenize(tokens, remove_special=True).lstrip(" ") == text


def test_bos_added_as_the_model_asks(vocab_spm):
    with Model(vocab_spm, vocab_only=True) as model:
        assert model.add_bos
        assert model.tokenize("hi")[0] == model.bos
        assert model.tokenize("hi", add_special=False)[0] != model.bos


def test_a_prompt_that_starts_with_bos_text_gets_one_bos(vocab_model):
    # A client that rendered a chat template itself sends text starting with the BOS token's text:
    # every prompt path (Model.tokenize_prompt) adds no second BOS, where llama_tokenize alone does.
    bos = vocab_model.bos
    bos_text = vocab_model.token_to_piece(bos, special=True).decode()
    assert vocab_model.add_bos and bos_text
    plain = vocab_model.tokenize_prompt("Hello world", parse_special=True)
    assert vocab_model.tokenize(bos_text + "Hello world", parse_special=True)[:2] == [bos, bos]  # the fault
    assert vocab_model.tokenize_prompt(bos_text + "Hello world", parse_special=True) == plain
    assert plain.count(bos) == 1 and plain[0] == bos
    assert vocab_model.tokenize_prompt(bos_text.encode() + b"Hello world", parse_special=True) == plain
    assert vocab_model.tokenize_prompt(bos_text, parse_special=True) == [bos]
    assert vocab_model.tokenize_chat(bos_text + "Hello world") == plain
    # Two BOS written by the client stay two; without parse_special the text is text; without specials, as written.
    assert vocab_model.tokenize_prompt(2 * bos_text + "Hi", parse_special=True)[:3].count(bos) == 2
    assert vocab_model.tokenize_prompt(bos_text + "Hi", parse_special=False).count(bos) == 1
    assert vocab_model.tokenize_prompt(bos_text + "Hi", add_special=False, parse_special=True) == \
        vocab_model.tokenize(bos_text + "Hi", add_special=False, parse_special=True)


def test_invalid_inputs_are_clean_errors(vocab_model):
    with pytest.raises(TokenizeError, match="lone surrogate"):
        vocab_model.tokenize("bad \ud800 text")
    with pytest.raises(TokenizeError, match="expected str or bytes"):
        vocab_model.tokenize(123)
    with pytest.raises(TokenizeError, match=r"token id -1 at index 1 is outside the vocabulary"):
        vocab_model.detokenize([1, -1])
    with pytest.raises(TokenizeError, match="outside the vocabulary"):
        vocab_model.detokenize([vocab_model.n_vocab])
    assert vocab_model.tokenize("", add_special=False) == []
    assert vocab_model.tokenize("nul\x00byte", add_special=False)


def test_vocab_only_model_cannot_make_a_context(vocab_spm):
    with Model(vocab_spm, vocab_only=True) as model:
        with pytest.raises(ContextError, match="vocab_only"):
            Context(model)


def test_layer_hparams_of_a_vocab_only_model_raise_instead_of_aborting(vocab_spm):
    from pyllm.errors import VocabOnlyError

    with Model(vocab_spm, vocab_only=True) as model:
        for attr in ("n_head", "n_head_kv", "n_swa", "requires_equal_kv_types"):
            with pytest.raises(VocabOnlyError, match="loaded vocab_only"):
                getattr(model, attr)
        with pytest.raises(VocabOnlyError):
            model.head_sizes()
        assert model.n_vocab > 0 and model.architecture == "llama"


def test_use_after_close_raises(vocab_spm):
    model = Model(vocab_spm, vocab_only=True)
    model.close()
    model.close()  # idempotent
    with pytest.raises(ClosedError, match="model is closed"):
        model.tokenize("x")
    with pytest.raises(ClosedError):
        model.n_layer
