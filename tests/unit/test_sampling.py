"""SamplingParams and the sampler chain built from them (no weights needed: a chain only needs n_vocab)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pyllm._ffi import ffi
from pyllm.errors import ConfigError
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
