"""Constrained output on the real default model (Gemma 3 270M Q4_K_M, a base model): twelve varied schemas of
tests/data/json_schemas.json, each turned into a grammar by llama.cpp's ``json_schema_to_grammar`` and
generated greedily through the batched engine, end by themselves with JSON that ``jsonschema`` validates
against the schema (formats asserted). The same prompts without the grammar give no such JSON, so the check
can fail. benchmarks/structured_output.py runs every schema (and reports the ones that do not finish)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from pyllm.batched import BatchedEngine
from pyllm.chat_common import json_schema_to_grammar
from pyllm.config import EngineConfig
from pyllm.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    """benchmarks/structured_output.py: the prompt and the validation (jsonschema, formats asserted)."""
    spec = importlib.util.spec_from_file_location("pyllm_structured_output", ROOT / "benchmarks" / "structured_output.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


so = _bench()
ENTRIES = {e["name"]: e for e in so.load_schemas()[0]}

# Varied: nested objects, $defs/$ref, recursion, arrays with minItems/maxItems, tuples, enums, const, anyOf,
# oneOf, allOf, formats (date, time, date-time, uuid), string lengths, patterns, integer ranges,
# additionalProperties false, required subsets; from the C++ test and from real-world use.
SUBSET = [
    "exotic formats",                                      # Draft 7 tuple of date, uuid, time, date-time
    "anyOf",                                               # anyOf of two $refs
    "mix of allOf, anyOf and $ref (similar to https://json.schemastore.org/tsconfig.json)",
    "min + max items with min + max values across zero",   # minItems/maxItems, integer range
    "simple regexp",                                       # pattern: optional, repeated and grouped parts
    "required + optional props each in original order",    # a required subset, additionalProperties false
    "literal string with escapes",                         # const with escapes
    "shape (oneOf with const discriminator)",
    "nullable fields (anyOf null, type array)",
    "issue (minLength/maxLength, enum array, nullable pattern)",
    "leaderboard (top-level array of objects)",
    "calendar event (date and time formats)",
]
MAX_TOKENS = 160


@pytest.fixture(scope="module")
def engine(default_model_path):
    with BatchedEngine(EngineConfig(model_path=str(default_model_path), n_parallel=4,
                                    n_ctx=4 * (512 + MAX_TOKENS)), max_queue=len(SUBSET)) as eng:
        yield eng


def _run(engine, names, grammar: bool):
    reqs = []
    for name in names:
        schema = ENTRIES[name]["schema"]
        sp = SamplingParams(temperature=0.0, grammar=json_schema_to_grammar(schema) if grammar else "")
        reqs.append((name, engine.submit(so.prompt_for(schema), max_tokens=MAX_TOKENS, sampling=sp)))
    return [(name, req.wait(600)) for name, req in reqs]


def test_the_subset_is_varied():
    assert len(SUBSET) == 12 and len(set(SUBSET)) == 12
    assert all(name in ENTRIES for name in SUBSET), [n for n in SUBSET if n not in ENTRIES]
    sources = {ENTRIES[n]["source"] for n in SUBSET}
    assert sources == {"test-json-schema-to-grammar.cpp", "real-world"}


def test_grammar_constrained_outputs_end_and_validate(engine):
    failures = []
    for name, res in _run(engine, SUBSET, grammar=True):
        if res.stop_reason != "eog":
            failures.append(f"{name}: {res.stop_reason} after {res.n_generated} tokens: {res.text[-80:]!r}")
            continue
        try:
            value = json.loads(res.text)
        except ValueError as e:
            failures.append(f"{name}: not JSON ({e}): {res.text!r}")
            continue
        errors = so.schema_errors(ENTRIES[name]["schema"], value)
        if errors:
            failures.append(f"{name}: {errors} for {res.text!r}")
    assert not failures, "\n".join(failures)


def test_without_the_grammar_the_same_prompts_give_no_valid_json(engine):
    # the check above can fail: unconstrained, the base model's greedy continuations are rarely a value the
    # schema accepts
    valid = []
    for name, res in _run(engine, SUBSET, grammar=False):
        try:
            if not so.schema_errors(ENTRIES[name]["schema"], json.loads(res.text)):
                valid.append(name)
        except ValueError:
            pass
    assert len(valid) <= 2, valid
