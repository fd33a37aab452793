"""The JSON schemas of tests/data/json_schemas.json through llama.cpp's converter as compiled into pyllm
(``pyllm.chat_common.json_schema_to_grammar``), no model needed:

- every schema converts, and llama.cpp's GBNF parser (``check_grammar``) accepts the grammar;
- for the cases of llama.cpp's tests/test-json-schema-to-grammar.cpp, the grammar is the one that test
  expects (compared after its ``trim()``), so the converter compiled here is the pinned one, behaving as
  upstream tests it;
- a schema llama.cpp cannot convert raises pyllm's GrammarError carrying llama.cpp's own reason, and the
  process (and the converter) carry on: no abort.

The data file is written by tests/data/extract_json_schemas.py (the C++ test's cases) and by hand (the
real-world ones); benchmarks/structured_output.py generates with every schema."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pyllm.chat_common import check_grammar, grammar_match, json_schema_to_grammar
from pyllm.errors import GrammarError, PyllmError

DATA = json.loads((Path(__file__).resolve().parents[1] / "data" / "json_schemas.json").read_text())
SCHEMAS = DATA["schemas"]
INVALID = DATA["invalid"]
CPP = "test-json-schema-to-grammar.cpp"


def _trim(text: str) -> str:
    """test-json-schema-to-grammar.cpp's trim(): blanks around the text and at the start of every line."""
    return re.sub(r"(^|\n)[ \t]+", r"\1", text.strip(" \n\r\t"))


def test_the_data_holds_the_cpp_cases_and_real_world_schemas():
    names = [e["name"] for e in SCHEMAS + INVALID]
    assert len(names) == len(set(names)), "entry names must be unique (they are test ids)"
    cpp = [e for e in SCHEMAS if e["source"] == CPP]
    real = [e for e in SCHEMAS if e["source"] == "real-world"]
    assert len(cpp) == 78 and all(e.get("expected_grammar") for e in cpp)   # the C++ test's SUCCESS cases
    assert len(real) >= 25 and len(SCHEMAS) == len(cpp) + len(real)
    assert {e["name"] for e in INVALID if e["source"] == CPP} == {
        "unknown type", "invalid type", "regexp with unbalanced parentheses"}    # its FAILURE cases


@pytest.mark.parametrize("entry", SCHEMAS, ids=[e["name"] for e in SCHEMAS])
def test_schema_converts_to_a_grammar_llama_cpp_parses(entry):
    grammar = json_schema_to_grammar(entry["schema"])
    check_grammar(grammar)
    assert re.search(r"^root ::= ", grammar, re.M), grammar
    if entry["source"] == CPP:
        # the C++ test converts with force_gbnf=true; without llguidance in the build both give GBNF
        assert _trim(json_schema_to_grammar(entry["schema"], force_gbnf=True)) == entry["expected_grammar"]
        assert _trim(grammar) == entry["expected_grammar"]


@pytest.mark.parametrize("entry", INVALID, ids=[e["name"] for e in INVALID])
def test_a_schema_llama_cpp_refuses_raises_its_reason(entry):
    with pytest.raises(GrammarError) as info:
        json_schema_to_grammar(entry["schema"])
    msg = str(info.value)
    assert isinstance(info.value, (PyllmError, ValueError))
    assert msg.startswith("json_schema cannot be turned into a grammar: JSON schema conversion failed:\n"), msg
    assert entry["error_contains"] in msg, msg
    # nothing was left broken: the next conversion works
    check_grammar(json_schema_to_grammar({"type": "integer", "minimum": 0}))


def test_what_the_converter_drops_is_looser_than_the_schema():
    """Facts the data file's notes rest on: llama.cpp's grammar ignores number bounds, multipleOf, uniqueItems
    and the email format, and a pattern replaces minLength/maxLength. (A grammar that enforced them would change these, and the notes.)"""
    free_number = json_schema_to_grammar({"type": "number"})
    assert json_schema_to_grammar({"type": "number", "minimum": 0, "maximum": 1}) == free_number
    assert (json_schema_to_grammar({"type": "integer", "minimum": 0, "maximum": 100, "multipleOf": 5})
            == json_schema_to_grammar({"type": "integer", "minimum": 0, "maximum": 100}))
    pattern = {"type": "string", "pattern": "^[a-z]+$"}
    assert json_schema_to_grammar({**pattern, "minLength": 3, "maxLength": 5}) == json_schema_to_grammar(pattern)
    assert json_schema_to_grammar({"type": "string", "format": "email"}) == json_schema_to_grammar({"type": "string"})
    items = {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}
    assert json_schema_to_grammar({**items, "uniqueItems": True}) == json_schema_to_grammar(items)


def test_some_pattern_grammars_admit_text_that_is_not_json():
    """The facts behind the notes on "regexp quote" and "regexp": llama.cpp's pattern conversion puts a literal
    quote in unescaped, and its '.' admits one too, so the grammar's output need not parse as JSON."""
    quote = json_schema_to_grammar({"type": "string", "pattern": '^"$'})
    assert grammar_match(quote, '"""').matched and not grammar_match(quote, '"\\""').matched
    with pytest.raises(ValueError):
        json.loads('"""')
    dot = json_schema_to_grammar({"type": "string", "pattern": "^a.$"})
    assert grammar_match(dot, '"a""').matched


def test_unsupported_patterns_are_the_ones_llama_cpp_lets_any_string_through():
    """``unsupported_patterns`` names exactly the patterns whose grammar is llama.cpp's "accepting any string"
    fallback (unanchored, ``\\d``/``\\w`` escapes, lookarounds), wherever they sit in the schema, and leaves
    the ones the converter expresses, and values that merely look like a pattern (``const``/``enum``)."""
    from pyllm.chat_common import unsupported_patterns

    schema = {"type": "object", "properties": {
        "zip": {"type": "string", "pattern": r"^\d{5}$"},
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]+$"},
        "pattern": {"type": "string", "pattern": "abc"},          # a property named "pattern", unanchored
        "list": {"type": "array", "items": {"anyOf": [{"type": "string", "pattern": "^(?=a)b$"}]}},
        "fixed": {"const": {"pattern": "not a schema"}}}}
    assert unsupported_patterns(schema) == [r"^\d{5}$", "abc", "^(?=a)b$"]
    assert unsupported_patterns({"type": "string", "pattern": "^[a-z]+$"}) == []
    assert unsupported_patterns(True) == [] and unsupported_patterns({}) == []
    # the fact it rests on: the converter's grammar for each of them is the same as for any string
    fallback = json_schema_to_grammar({"type": "string", "pattern": "unanchored"})
    assert grammar_match(fallback, '"anything 123"').matched
    for p in unsupported_patterns(schema):
        assert json_schema_to_grammar({"type": "string", "pattern": p}) == fallback
    assert json_schema_to_grammar({"type": "string", "pattern": "^[a-z]+$"}) != fallback
