"""SamplingParams and the sampler chain built from them (no weights needed: a chain only needs n_vocab)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pyllm._ffi import ffi
from pyllm.errors import ConfigError, GrammarError
from pyllm.sampling import Sampler, SamplingParams, argmax_biased, bias_arrays


def test_logit_bias_is_kept_as_pairs_from_a_mapping_or_pairs():
    assert SamplingParams(logit_bias={5: -100, 7: 2.5}).logit_bias == ((5, -100.0), (7, 2.5))
    assert SamplingParams(logit_bias=[(5, -math.inf), [5, 1]]).logit_bias == ((5, -math.inf), (5, 1.0))
    assert SamplingParams().logit_bias == () and SamplingParams(logit_bias=None).logit_bias == ()
    hash(SamplingParams(logit_bias={1: 1}))  # still a frozen, hashable value


@pytest.mark.parametrize("bad", [{-1: 1.0}, {"5": 1.0}, {True: 1.0}, {5: math.nan}, {5: math.inf}, {5: "x"},
                                 [(1, 2, 3)], 5])
def test_bad_logit_bias_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="logit_bias"):
        SamplingParams(logit_bias=bad)


def test_a_token_outside_the_vocabulary_is_refused_before_llama_cpp_sees_it():
    params = SamplingParams(logit_bias={100: 1.0})
    with pytest.raises(ConfigError, match="token 100 is outside the vocabulary"):
        Sampler(params, n_vocab=100)
    params.check_vocab(101)


def test_chain_holds_logit_bias_first_and_typical_when_asked():
    with Sampler(SamplingParams(typical_p=0.5, logit_bias={3: 1.0}, seed=1), n_vocab=100) as s:
        assert s.chain == ["logit-bias", "top-k", "typical", "top-p", "min-p", "temp", "dist"]
    with Sampler(SamplingParams(), n_vocab=100) as s:
        assert "typical" not in s.chain and "logit-bias" not in s.chain
    with pytest.raises(ConfigError, match="typical_p"):
        SamplingParams(typical_p=1.5)


def test_greedy_with_a_bias_reads_the_row_in_place_and_restores_it():
    row = np.array([0.0, 5.0, 4.0, 1.0], dtype=np.float32)
    ptr = ffi.cast("float *", ffi.from_buffer(row))
    assert argmax_biased(ptr, 4, bias_arrays(SamplingParams(temperature=0, logit_bias={1: -math.inf}))) == 2
    # repeats add up, as llama.cpp's logit-bias sampler adds each entry
    assert argmax_biased(ptr, 4, bias_arrays(SamplingParams(temperature=0, logit_bias=[(3, 2.5), (3, 2.0)]))) == 3
    assert row.tolist() == [0.0, 5.0, 4.0, 1.0]
    assert bias_arrays(SamplingParams()) is None


# ---------------------------------------------------------------------------------------------------
# grammar (GBNF): checked by llama.cpp's grammar parser, placed first in the chain, refused without a model
# ---------------------------------------------------------------------------------------------------
GRAMMAR = 'root ::= "yes" | "no"'


@pytest.fixture(scope="module")
def vocab_model(default_model_path):
    from pyllm.model import Model

    with Model(default_model_path, vocab_only=True) as m:
        yield m


def test_a_grammar_is_checked_when_the_params_are_made():
    assert SamplingParams(grammar=GRAMMAR).grammar == GRAMMAR
    with pytest.raises(GrammarError, match="expecting ::="):
        SamplingParams(grammar="root = 'yes'")
    with pytest.raises(GrammarError, match="does not define 'root'"):
        SamplingParams(grammar='answer ::= "yes"')
    with pytest.raises(ConfigError, match="grammar is a bytes"):
        SamplingParams(grammar=b'root ::= "a"')


@pytest.mark.parametrize("kwargs, match", [
    ({"grammar": GRAMMAR, "grammar_lazy": True}, "needs at least one trigger"),
    ({"grammar": GRAMMAR, "grammar_trigger_patterns": ("<tool_call>",)}, "not lazy"),
    ({"grammar_lazy": True, "grammar_trigger_tokens": (5,)}, "need a grammar"),
    ({"grammar": GRAMMAR, "grammar_lazy": True, "grammar_trigger_tokens": (-1,)}, "token ids"),
    ({"grammar": GRAMMAR, "grammar_lazy": True, "grammar_trigger_patterns": "<tool_call>"}, "sequence of non-empty"),
    ({"grammar": GRAMMAR, "grammar_lazy": True, "grammar_trigger_tokens": (5,), "grammar_prefill": "<think>"},
     "non-lazy grammar only"),
])
def test_lazy_grammar_settings_are_validated(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SamplingParams(**kwargs)


def test_a_grammar_is_never_the_plain_greedy_fast_path():
    assert SamplingParams(temperature=0).is_plain_greedy
    assert not SamplingParams(temperature=0, grammar=GRAMMAR).is_plain_greedy


def test_a_grammar_needs_the_model(vocab_model):
    params = SamplingParams(temperature=0, grammar=GRAMMAR)
    with pytest.raises(ConfigError, match="model="):
        Sampler(params, n_vocab=vocab_model.n_vocab)
    with Sampler(params, vocab_model.n_vocab, model=vocab_model) as s:
        assert s.chain == ["grammar", "greedy"]
    with Sampler(SamplingParams(grammar=GRAMMAR, logit_bias={1: 1.0}, seed=1), vocab_model.n_vocab,
                 model=vocab_model) as s:
        assert s.chain[:2] == ["grammar", "logit-bias"]   # before everything, as common_sampler applies it


def test_what_llama_cpp_refuses_when_building_the_grammar_is_a_grammar_error(vocab_model):
    n = vocab_model.n_vocab
    bad_regex = SamplingParams(grammar=GRAMMAR, grammar_lazy=True, grammar_trigger_patterns=("(unclosed",))
    with pytest.raises(GrammarError, match="cannot build the grammar"):
        Sampler(bad_regex, n, model=vocab_model)     # std::regex_error, caught in the glue
    left_recursive = SamplingParams(grammar='root ::= root "a" | "a"')
    with pytest.raises(GrammarError, match="left recursion"):
        Sampler(left_recursive, n, model=vocab_model)
    with pytest.raises(ConfigError, match="grammar_trigger_tokens token"):
        Sampler(SamplingParams(grammar=GRAMMAR, grammar_lazy=True, grammar_trigger_tokens=(n,)), n, model=vocab_model)


def test_the_grammar_sampler_closes_with_its_model(default_model_path):
    from pyllm.model import Model

    m = Model(default_model_path, vocab_only=True)
    s = Sampler(SamplingParams(grammar=GRAMMAR), m.n_vocab, model=m)
    m.close()
    assert s.closed


def test_a_prefill_the_grammar_rejects_is_a_grammar_error(vocab_model):
    params = SamplingParams(grammar=GRAMMAR, grammar_prefill="maybe")
    with pytest.raises(GrammarError, match="does not accept the generation prompt"):
        Sampler(params, vocab_model.n_vocab, model=vocab_model)
    with Sampler(SamplingParams(grammar='root ::= "<think>" [a-z]+', grammar_prefill="<think>"), vocab_model.n_vocab,
                 model=vocab_model) as s:
        s.reset()   # re-advanced past the prefill
