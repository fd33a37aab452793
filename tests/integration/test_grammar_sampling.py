"""Grammar-constrained sampling on the real default model (Gemma 3 270M Q4_K_M, a base model): a JSON schema
turned into GBNF by llama.cpp's json_schema_to_grammar, sampled through pyllm's Sampler, gives JSON that the
``jsonschema`` package validates; a lazy grammar waits for its trigger. A small decode loop of its own (the
engine's loop builds its Sampler without the model, and is being reworked elsewhere)."""
from __future__ import annotations

import json

import jsonschema
import pytest

from pyllm.chat_common import json_schema_to_grammar
from pyllm.context import Context
from pyllm.errors import GrammarError
from pyllm.model import Model
from pyllm.sampling import Sampler, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "colors"],
    "additionalProperties": False,
}
PROMPT = "A person described as JSON:\n"


@pytest.fixture(scope="module")
def model(default_model_path):
    with Model(default_model_path) as m:
        yield m


def _generate(model: Model, params: SamplingParams, prompt: str, max_tokens: int) -> tuple[str, bool]:
    """(text, ended): sample until an end-of-generation token or max_tokens."""
    pieces, ended = _pieces(model, params, prompt, max_tokens)
    return b"".join(pieces).decode("utf-8"), ended


def _pieces(model: Model, params: SamplingParams, prompt: str, max_tokens: int) -> tuple[list[bytes], bool]:
    with Context(model, n_ctx=512, n_batch=512) as ctx, Sampler(params, model.n_vocab, model=model) as sampler:
        ctx.decode(model.tokenize(prompt), logits="last")
        pieces = []
        for _ in range(max_tokens):
            token = sampler.sample(ctx)
            if model.is_eog(token):
                return pieces, True
            pieces.append(model.token_to_piece(token))
            ctx.decode_one(token)
        return pieces, False


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (0.8, 7), (1.5, 11)])
def test_json_schema_grammar_output_validates(model, temperature, seed):
    grammar = json_schema_to_grammar(SCHEMA)
    text, ended = _generate(model, SamplingParams(temperature=temperature, seed=seed, grammar=grammar), PROMPT, 200)
    assert ended, f"the grammar did not let the model finish: {text!r}"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_without_the_grammar_the_base_model_writes_no_such_json(model):
    # the check above can fail: the same prompt, unconstrained, is not valid JSON of that schema
    text, _ = _generate(model, SamplingParams(temperature=0.0), PROMPT, 60)
    with pytest.raises((ValueError, jsonschema.ValidationError)):
        jsonschema.validate(json.loads(text), SCHEMA)


def _ecma_escape(text: str) -> str:
    return "".join("\\" + c if c in "\\^$.|?*+()[]{}" else c for c in text)


def test_a_lazy_grammar_leaves_the_text_alone_until_its_trigger(model):
    # The trigger is the text the model writes first anyway (greedy): until then the output is the free one,
    # from the trigger on only the grammar's continuation is allowed, then the end.
    prompt = "The three primary colors are"
    free, _ = _pieces(model, SamplingParams(temperature=0.0), prompt, 12)
    trigger = b"".join(free[:3]).decode("utf-8")   # whole tokens: the grammar takes over right after them
    assert len(trigger) >= 3 and "DONE" not in trigger, free
    grammar = f"root ::= {json.dumps(trigger)} \" DONE\""
    params = SamplingParams(temperature=0.0, grammar=grammar, grammar_lazy=True,
                            grammar_trigger_patterns=(_ecma_escape(trigger),))
    text, ended = _generate(model, params, prompt, 40)
    assert ended and text == trigger + " DONE", (free, text)


def test_a_grammar_that_allows_no_token_is_an_error_not_an_abort(model):
    # After "a" the grammar allows only the end, and the end-of-generation tokens are banned (ignore_eos):
    # every candidate is rejected. llama.cpp would accept a rejected token here (and abort on a rejected EOG).
    params = SamplingParams(temperature=0.0, grammar='root ::= "a"').with_banned(model.eog_tokens)
    with pytest.raises(GrammarError, match="allows no token"):
        _generate(model, params, "a", 5)


def test_a_json_schema_grammar_through_the_batched_engine(default_model_path):
    """The engine core builds grammar chains with the model and samples them through the checked path."""
    import json as _json

    import jsonschema as _jsonschema

    from pyllm.batched import BatchedEngine
    from pyllm.chat_common import json_schema_to_grammar
    from pyllm.config import EngineConfig
    from pyllm.sampling import SamplingParams as _SP

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    sp = _SP(temperature=0.0, grammar=json_schema_to_grammar(schema))
    with BatchedEngine(EngineConfig(model_path=str(default_model_path), n_ctx=512, n_parallel=2)) as eng:
        reqs = [eng.submit(p, max_tokens=64, sampling=sp) for p in ("A person:", "JSON of a cat owner:")]
        for r in reqs:
            res = r.wait(300)
            assert res.stop_reason in ("eog", "max_tokens"), res
            if res.stop_reason == "eog":   # the grammar completed: valid JSON that the schema accepts
                _jsonschema.validate(_json.loads(res.text), schema)
            else:                          # cut by max_tokens: still a prefix the grammar allowed
                assert res.text.lstrip().startswith("{")
