"""benchmarks/structured_output.py's own machinery (no model): the verdict on an output, the format checks it
adds to jsonschema's, and the --url mode's requests and answers, against a stand-in server speaking
llama-server's documented chat completion shape."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import httpx
import pytest

from pyllm.chat_common import json_schema_to_grammar

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("pyllm_structured_output", ROOT / "benchmarks" / "structured_output.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


so = _load()

PERSON = {"name": "person", "source": "real-world",
          "schema": {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 150}},
                     "required": ["age"], "additionalProperties": False}}


@pytest.mark.parametrize("text, ok", [
    ("12:30:59Z", True), ("23:59:60+05:30", True), ("00:00:00.123-00:00", True),
    ("12:30:59", False),          # RFC 3339 full-time needs an offset
    ("24:00:00Z", False), ("12:60:00Z", False), ("1:30:00Z", False), ("12:30:00+24:00", False),
])
def test_rfc3339_time(text, ok):
    assert so._rfc3339_time(text) is ok


@pytest.mark.parametrize("text, ok", [
    ("2024-02-29T12:00:00Z", True), ("2024-02-29t12:00:00.5+01:00", True),
    ("2023-02-29T12:00:00Z", False),   # not a calendar day (llama.cpp's date grammar admits it)
    ("2024-02-29 12:00:00Z", False), ("2024-2-29T12:00:00Z", False), ("2024-02-29T12:00:00", False),
])
def test_rfc3339_date_time(text, ok):
    assert so._rfc3339_date_time(text) is ok


def test_formats_are_asserted_and_the_draft_follows_the_schema():
    assert so.schema_errors({"type": "string", "format": "uuid"}, "123e4567-e89b-12d3-a456-426614174000") == []
    assert so.schema_errors({"type": "string", "format": "uuid"}, "not-a-uuid")
    assert so.schema_errors({"type": "string", "format": "time"}, "12:00:00")
    assert so.schema_errors({"type": "string", "format": "date"}, "2023-02-30")
    # "items": [...] is a Draft 7 tuple (invalid under 2020-12): validated as Draft 7
    tuple7 = {"items": [{"type": "string"}, {"type": "integer"}]}
    assert so.validator_for(tuple7).__class__.__name__ == "Draft7Validator"
    assert so.schema_errors(tuple7, ["a", 1]) == [] and so.schema_errors(tuple7, ["a", "b"])
    assert so.validator_for(PERSON["schema"]).__class__.__name__ == "Draft202012Validator"


def test_judge():
    grammar = json_schema_to_grammar(PERSON["schema"])
    ok = so.judge(PERSON, "greedy", "eog", 7, '{"age": 42}', grammar)
    assert ok.ok and ok.json_ok and ok.schema_ok and ok.grammar_ok and ok.reason == ""
    cut = so.judge(PERSON, "greedy", "max_tokens", 512, '{"age": 14', grammar)   # a prefix the grammar allows
    assert not cut.ok and not cut.json_ok and cut.grammar_ok and cut.reason.startswith("cut at 512 tokens (max_tokens)")
    bad = so.judge(PERSON, "greedy", "eog", 7, '{"age": 151}', None)   # what a looser grammar lets through
    assert not bad.ok and bad.json_ok and not bad.schema_ok and bad.grammar_ok is None
    assert "151 is greater than the maximum of 150" in bad.reason
    # an output the grammar did not allow is flagged (the sampling path would be broken)
    assert so.judge(PERSON, "greedy", "eog", 7, '{"age": 42, "x": 1}', grammar).grammar_ok is False


def test_response_format_is_openais_json_schema_shape():
    rf = so.response_format({"name": "min + max items (with values) across zero", "schema": {"type": "integer"}})
    assert rf == {"type": "json_schema",
                  "json_schema": {"name": "min_max_items_with_values_across_zero", "schema": {"type": "integer"}}}


def test_url_mode_requests_and_verdicts():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "gemma", "object": "model"}]})
        assert request.url.path == "/v1/chat/completions"
        body = json.loads(request.content)
        seen.append(body)
        schema = body["response_format"]["json_schema"]["schema"]
        if schema.get("maximum") == 7:
            return httpx.Response(400, json={"error": {"code": 400, "message": "bad schema", "type": "invalid_request_error"}})
        content, finish = ('{"age": 3}', "stop") if body["temperature"] == 0 else ('{"age": 33333', "length")
        return httpx.Response(200, json={"choices": [{"index": 0, "finish_reason": finish,
                                                      "message": {"role": "assistant", "content": content}}],
                                         "usage": {"completion_tokens": 5}})

    entries = [PERSON, {"name": "refused", "source": "real-world", "schema": {"type": "integer", "maximum": 7}}]
    args = so.build_parser().parse_args(["--url", "http://server.test/v1", "-n", "64", "--seed", "5"])
    modes = [so.Mode("greedy", 0.0, None), so.Mode("sampled", 0.8, 5)]
    out = so.run_url(entries, modes, args, transport=httpx.MockTransport(handler))
    assert [(o.name, o.mode) for o in out] == [("person", "greedy"), ("person", "sampled"),
                                              ("refused", "greedy"), ("refused", "sampled")]
    assert out[0].ok and out[0].finish == "eog" and out[0].n_tokens == 5
    assert not out[1].ok and out[1].finish == "max_tokens" and out[1].reason.startswith("cut at 5 tokens")
    assert out[2].finish == "refused" and out[2].reason.startswith("HTTP 400") and "bad schema" in out[2].reason
    greedy = next(b for b in seen if b["temperature"] == 0 and b["response_format"]["json_schema"]["name"] == "person")
    assert greedy["model"] == "gemma" and greedy["max_tokens"] == 64 and "seed" not in greedy
    assert greedy["messages"] == [{"role": "user", "content": so.prompt_for(PERSON["schema"], cue=False)}]
    assert greedy["response_format"] == {"type": "json_schema",
                                         "json_schema": {"name": "person", "schema": PERSON["schema"]}}
    assert len(seen) == 4 and all(b["seed"] == 5 for b in seen if b["temperature"] == 0.8)
    # the refused schema is counted apart from the runs
    line = so.summary(out, modes, 2, "x")
    assert "refused 2 " in line and "success (ended, JSON, schema-valid) 1/2 (greedy 1/1; sampled 0/1)" in line, line
