"""llama.cpp's common chat library through pyllm.chat_common: templates applied with tools and schemas,
replies parsed (whole and streamed), JSON schema to grammar, and every failure a pyllm error with llama.cpp's
reason. No weights needed."""
from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from pyllm.chat import shipped_templates
from pyllm.chat_common import ChatParser, ChatTemplates, check_grammar, json_schema_to_grammar
from pyllm.errors import BrokenChatTemplateError, ChatTemplateError, ConfigError, GrammarError, ToolCallParseError

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
USER = [{"role": "user", "content": "Weather in Paris?"}]


def _templates(name: str) -> ChatTemplates:
    return ChatTemplates(shipped_templates()[name].read_text(), name=name)


@pytest.fixture(scope="module")
def glm():
    with _templates("GLM-4.7-Flash") as t:
        yield t


@pytest.fixture(scope="module")
def qwen35():
    with _templates("Qwen3.5-4B") as t:
        yield t


def test_glm_with_tools_gets_a_lazy_tool_call_grammar_and_a_parser(glm):
    p = glm.apply(USER, tools=[WEATHER])
    assert p.format == "peg-native"
    assert "get_weather" in p.prompt and "Weather in Paris?" in p.prompt
    assert p.generation_prompt.endswith("<think>")          # GLM-4.7-Flash opens the reasoning block
    assert p.grammar and p.grammar_lazy and p.grammar_triggers
    assert all(t.type in ("word", "pattern", "pattern_full", "token") for t in p.grammar_triggers)
    assert p.supports_thinking and p.thinking_start_tag == "<think>" and "</think>" in p.thinking_end_tags
    msg = p.make_parser().parse("Paris it is.</think><tool_call>get_weather<arg_key>city</arg_key>"
                                "<arg_value>Paris</arg_value></tool_call>")
    assert msg.reasoning_content == "Paris it is."
    assert [(c.name, json.loads(c.arguments)) for c in msg.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert msg.to_openai()["content"] is None and msg.to_openai()["tool_calls"][0]["type"] == "function"


def test_no_tools_and_no_schema_means_no_grammar(glm):
    p = glm.apply(USER, enable_thinking=False)
    assert p.grammar == "" and not p.grammar_lazy and p.grammar_triggers == ()
    assert p.make_parser().parse("Hello!").content == "Hello!"


def test_a_json_schema_gives_an_eager_grammar(qwen35):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    p = qwen35.apply(USER, json_schema=schema, enable_thinking=False)
    assert p.grammar and not p.grammar_lazy
    fields = p.grammar_sampling(_NoModel())
    assert fields["grammar"] == p.grammar and fields["grammar_prefill"] == p.generation_prompt


class _NoModel:
    def tokenize(self, text, add_special=False, parse_special=True):  # noqa: ARG002 - duck-typed Model
        raise AssertionError("an eager grammar needs no tokenizing")


def test_streamed_deltas_add_up_to_the_whole_parse(qwen35):
    p = qwen35.apply(USER, tools=[WEATHER], enable_thinking=False)
    text = ("Let me look.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
            "</function>\n</tool_call>")
    parser = p.make_parser()
    content, calls = "", {}
    for i in range(len(text)):
        _, deltas = parser.update(text[i], is_partial=i + 1 < len(text))
        for d in deltas:
            content += d.content_delta
            if d.tool_call_index is not None:
                c = calls.setdefault(d.tool_call_index, {"name": "", "arguments": "", "id": ""})
                c["name"] = d.tool_call.name or c["name"]
                c["id"] = d.tool_call.id or c["id"]
                c["arguments"] += d.tool_call.arguments
    final, _ = parser.update("", is_partial=False)
    whole = p.make_parser().parse(text)
    assert content.strip() == whole.content.strip() == "Let me look."
    assert len(calls) == 1 and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == json.loads(whole.tool_calls[0].arguments) == {"city": "Paris"}
    # llama-server's ids: 32 letters and digits, the same in every delta and in the message
    assert len(calls[0]["id"]) == 32 and calls[0]["id"].isalnum() and final.tool_calls[0].id == calls[0]["id"]


def test_caps_come_from_llama_cpp(qwen35):
    caps = qwen35.caps
    assert caps["supports_tools"] and caps["supports_tool_calls"] and caps["supports_object_arguments"]
    with ChatTemplates("{% for m in messages %}{{ m.content }}{% endfor %}") as plain:
        assert not plain.caps["supports_tool_calls"]


# ---------------------------------------------------------------------------------------------------
# errors: pyllm's classes, llama.cpp's reasons
# ---------------------------------------------------------------------------------------------------
def test_template_errors():
    with pytest.raises(ChatTemplateError, match="empty"):
        ChatTemplates("   ")
    with pytest.raises(BrokenChatTemplateError, match="does not compile"):
        ChatTemplates("{% for m in messages %}{{ m.content }")


@pytest.mark.parametrize("kwargs, match", [
    ({"tool_choice": "always"}, "tool_choice='always'"),
    ({"reasoning_format": "xml"}, "reasoning_format='xml'"),
    ({"json_schema": {"type": "object"}, "grammar": 'root ::= "a"'}, "json_schema and grammar"),
    ({"tools": [WEATHER], "grammar": 'root ::= "a"'}, "cannot be combined with tools"),
    ({"json_schema": "object"}, "json_schema is a str"),
    ({"continue_final_message": True}, "cannot both be set"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls='yes'"),
    ({"now": float("nan")}, "now=nan"),
])
def test_bad_options_are_config_errors(glm, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        glm.apply(USER, **kwargs)


@pytest.mark.parametrize("messages, match", [
    ("hi", "expected a list of message dicts"),
    ([], "messages is empty"),
    ([{"content": "x"}], "Missing 'role'"),
    ([{"role": "user", "content": 5}], "Invalid 'content' type"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}], "Missing tool call type"),
    ([{"role": "user", "content": float("inf")}], "cannot be sent as JSON"),
    ([{"role": "user", "content": "\ud800"}], "lone surrogate"),
])
def test_bad_messages_are_chat_template_errors_naming_the_value(glm, messages, match):
    with pytest.raises(ChatTemplateError, match=match):
        glm.apply(messages)


def test_bad_tools_are_refused(glm):
    with pytest.raises(ChatTemplateError, match="Unsupported tool type"):
        glm.apply(USER, tools=[{"type": "retrieval"}])
    with pytest.raises(ChatTemplateError, match="tools is str"):
        glm.apply(USER, tools="get_weather")


def test_a_reply_that_breaks_the_format_is_a_tool_call_parse_error(qwen35):
    p = qwen35.apply(USER, tools=[WEATHER], tool_choice="required", enable_thinking=False)
    parser = p.make_parser()
    with pytest.raises(ToolCallParseError, match=p.format):   # a tool that was not offered
        parser.parse("<tool_call>\n<function=get_time>\n<parameter=city>\nParis\n</parameter>\n</function>\n"
                     "</tool_call>")
    # while streaming, an unfinished reply is not an error
    assert parser.parse("<tool_call>\n<function=get_wea", is_partial=True).content == ""


def test_parser_construction_errors():
    with pytest.raises(ConfigError, match="unknown chat format 'xml'"):
        ChatParser("xml")
    with pytest.raises(ConfigError, match="cannot make a chat parser"):
        ChatParser("peg-native", parser="{not json")


def test_json_schema_to_grammar():
    g = json_schema_to_grammar({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    assert "root ::=" in g
    check_grammar(g)
    with pytest.raises(GrammarError, match="cannot be turned into a grammar"):
        json_schema_to_grammar({"$ref": "#/definitions/missing"})
    with pytest.raises(GrammarError, match="expected a JSON schema object"):
        json_schema_to_grammar(["not", "a", "schema"])


@pytest.mark.parametrize("grammar, match", [
    ('root ::= "a', "unexpected end of input"),
    ('root ::= item\n', "Undefined rule identifier 'item'"),
    ('item ::= "a"\n', "does not define 'root'"),
    ("root = 'a'", "expecting ::="),
    ('root ::= "a"\0', "NUL character"),
])
def test_check_grammar_gives_llama_cpp_reason(grammar, match):
    with pytest.raises(GrammarError, match=match):
        check_grammar(grammar)


def test_common_log_lines_reach_python_logging(caplog):
    # llama.cpp's chat code warns through common/log.h; the glue routes it to the pyllm.native logger.
    with _templates("google-gemma-2-2b-it") as t, caplog.at_level(logging.WARNING, logger="pyllm.native"):
        t.apply([{"role": "system", "content": "Be brief."}])
    assert any("system" in r.getMessage().lower() for r in caplog.records if r.name == "pyllm.native"), caplog.text


def test_use_after_close_raises(glm):
    t = ChatTemplates("{{ messages[0].content }}")
    t.close()
    t.close()
    with pytest.raises(ValueError, match="closed"):
        t.apply(USER)


def test_grammar_match():
    from pyllm.chat_common import grammar_match

    g = 'root ::= "{" [a-z]+ "}"'
    assert grammar_match(g, "{abc}").matched
    m = grammar_match(g, "{ab")
    assert not m.matched and m.incomplete and m.matched_chars == 3
    m = grammar_match(g, "{a1}")
    assert not m.matched and not m.incomplete and m.matched_chars == 2
    assert grammar_match('root ::= "é" [^x]', "é日").matched   # code points, not bytes
    with pytest.raises(GrammarError, match="expecting"):
        grammar_match("root = x", "x")


def test_a_template_grammar_becomes_sampling_params_and_a_sampler(qwen35):
    # llama-server's conversion (server-schema.cpp): a trigger word that is one preserved token of the model
    # becomes a token trigger, another word an escaped regex; the result builds a grammar sampler.
    from pathlib import Path

    from pyllm.model import Model
    from pyllm.sampling import Sampler, SamplingParams

    vocab = Path(__file__).resolve().parents[2] / "vendor" / "llama.cpp" / "models" / "ggml-vocab-qwen35.gguf"
    p = qwen35.apply(USER, tools=[WEATHER])
    words = [t for t in p.grammar_triggers if t.type == "word"]
    assert any(t.value == "<tool_call>" for t in words) and "<tool_call>" in p.preserved_tokens
    with Model(vocab, vocab_only=True) as qwen:
        # this vocab-only file has no <tool_call> token (4 pieces): the word is a regex trigger
        assert len(qwen.tokenize("<tool_call>", add_special=False, parse_special=True)) > 1
        fields = p.grammar_sampling(qwen)
        assert fields["grammar_lazy"] and fields["grammar"] == p.grammar
        assert "<tool_call>" in fields["grammar_trigger_patterns"] and fields["grammar_trigger_tokens"] == ()
        with Sampler(SamplingParams(temperature=0.6, seed=1, **fields), qwen.n_vocab, model=qwen) as s:
            assert s.chain[0] == "grammar"

    class OneTokenToolCall:  # a vocabulary where <tool_call> is the single token 7
        def tokenize(self, text, add_special=False, parse_special=True):  # noqa: ARG002
            return [7] if text == "<tool_call>" else [1, 2]

    fields = p.grammar_sampling(OneTokenToolCall())
    assert 7 in fields["grammar_trigger_tokens"] and "<tool_call>" not in fields["grammar_trigger_patterns"]
    unpreserved = dataclasses.replace(p, preserved_tokens=())
    with pytest.raises(GrammarError, match="not a preserved token"):
        unpreserved.grammar_sampling(OneTokenToolCall())
