"""BatchedEngine's per-token logprobs: read from the logits row in the engine thread, on request only."""
from __future__ import annotations

import numpy as np
import pytest

from pyllm.batched import BatchedEngine, TokenLogprob
from pyllm.config import EngineConfig
from pyllm.errors import ConfigError
from pyllm.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine(default_model_path):
    with BatchedEngine(EngineConfig(model_path=str(default_model_path), n_ctx=512, n_parallel=2)) as eng:
        yield eng


def test_greedy_tokens_are_their_rows_argmax_and_spell_the_text(engine):
    req = engine.submit("The capital of France is", max_tokens=8, logprobs=4)
    result = req.wait(120)
    assert [e.token for e in req.logprobs] == result.tokens and len(result.tokens) == 8
    assert b"".join(e.piece for e in req.logprobs).decode() == result.text
    for e in req.logprobs:
        assert isinstance(e, TokenLogprob) and len(e.top) == 4
        assert e.top[0][0] == e.token and e.top[0][2] == pytest.approx(e.logprob) and e.logprob <= 0
        probs = np.exp([lp for _t, _p, lp in e.top])
        assert list(probs) == sorted(probs, reverse=True) and probs.sum() <= 1 + 1e-6


def test_sampled_tokens_get_their_own_logprob_and_none_are_kept_unasked(engine):
    seeded = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    req = engine.submit("Once upon a time", max_tokens=12, sampling=seeded, logprobs=0)
    result = req.wait(120)
    assert [e.token for e in req.logprobs] == result.tokens
    assert all(e.top == () and e.logprob <= 0 for e in req.logprobs)
    # a temperature-1.5 draw picks some token that is not the row's argmax: its logprob is lower than the top's
    again = engine.submit("Once upon a time", max_tokens=12, sampling=seeded, logprobs=1)
    again.wait(120)
    assert [e.token for e in again.logprobs] == result.tokens  # same seed, same draw
    assert any(e.top[0][0] != e.token and e.top[0][2] > e.logprob for e in again.logprobs)
    plain = engine.submit("Once upon a time", max_tokens=3)
    plain.wait(120)
    assert plain.logprobs == []


@pytest.mark.parametrize("bad", [-1, 21, True, 2.0, "3"])
def test_bad_logprobs_are_a_config_error(engine, bad):
    with pytest.raises(ConfigError, match=r"logprobs=.* expected None or an integer in \[0, 20\]"):
        engine.submit("Hi", max_tokens=1, logprobs=bad)
