"""The parser facts of llama.cpp's tests/test-chat.cpp (test_template_output_peg_parsers), checked through
pyllm.chat_common: for each case, the template applied with the case's request, the model output parsed whole
and streamed (every growing prefix with is_partial=True, the deltas accumulated as a client does), and the
content, reasoning and tool calls compared the way the C++ test compares them (``assert_msg_equals`` with
whitespace differences ignored: surrounding whitespace stripped, arguments compared as re-serialized JSON,
an incomplete JSON argument counting as ""). Cases marked ``expect_reconstruction`` also re-render the
conversation with the parsed reply appended and must reproduce prompt + output. The grammar the template
gives must admit the output from the point its trigger fires (test_peg_parser's grammar check, ported below).

tests/data/test_chat_cases.json is extracted from the pinned sdist's test-chat.cpp by
tests/data/extract_test_chat.py (see its docstring)."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from pyllm.chat import shipped_templates
import re

from pyllm.chat_common import ChatParams, ChatTemplates, ParsedMessage, grammar_match

DATA = json.loads((Path(__file__).resolve().parents[1] / "data" / "test_chat_cases.json").read_text())
CASES = DATA["cases"]
# The order test-chat.cpp's own comment asks for is kept: GLM-4.7-Flash first, then the rest as the file has them.
_FIRST = ["GLM-4.7-Flash.jinja", "GLM-4.6.jinja", "Qwen3-Coder.jinja", "Qwen3.5-4B.jinja", "MiniMax-M2.jinja"]


def _case_id(i: int, c: dict) -> str:
    return f"{c['template'].removesuffix('.jinja')}-{i}"


def _ordered():
    rank = {t: n for n, t in enumerate(_FIRST)}
    idx = sorted(range(len(CASES)), key=lambda i: (rank.get(CASES[i]["template"], len(_FIRST)), i))
    return [pytest.param(CASES[i], id=_case_id(i, CASES[i])) for i in idx]


@functools.lru_cache(maxsize=None)
def _templates(name: str) -> ChatTemplates:
    return ChatTemplates(shipped_templates()[name.removesuffix(".jinja")].read_text(), name=name)


_WS = " \t\n\v\f\r"   # C isspace(): string_strip of llama.cpp's common.cpp


def _renormalize(args: str) -> str:
    try:
        return json.dumps(json.loads(args), ensure_ascii=False, separators=(",", ":"))
    except ValueError:
        return ""   # renormalize_json: partial JSON compares as ""


def _norm(content: str, reasoning: str, calls) -> tuple:
    return (content.strip(_WS), reasoning.strip(_WS),
            tuple((c["name"], _renormalize(c["arguments"]), c["id"]) for c in calls))


def _of(msg: ParsedMessage, ids: bool = True) -> tuple:
    return _norm(msg.content, msg.reasoning_content,
                 [{"name": c.name, "arguments": c.arguments, "id": c.id if ids else ""} for c in msg.tool_calls])


def _apply(case: dict, messages=None, add_generation_prompt=None):
    p = case["params"]
    return _templates(case["template"]).apply(
        messages if messages is not None else p["messages"],
        tools=[DATA["tools"][n] for n in p["tools"]] or None,
        tool_choice=p["tool_choice"], parallel_tool_calls=p["parallel_tool_calls"], json_schema=p["json_schema"],
        grammar=p["grammar"] or None, enable_thinking=p["enable_thinking"], reasoning_format=p["reasoning_format"],
        add_generation_prompt=p["add_generation_prompt"] if add_generation_prompt is None else add_generation_prompt,
        continue_final_message=p["continue_final_message"])


def test_the_cases_cover_the_templates_the_brief_names():
    templates = {c["template"] for c in CASES}
    for name in _FIRST + ["deepseek-ai-DeepSeek-V3.1.jinja", "meta-llama-Llama-3.3-70B-Instruct.jinja",
                          "mistralai-Ministral-3-14B-Reasoning-2512.jinja",
                          "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja",
                          "meetkai-functionary-medium-v3.2.jinja"]:
        assert name in templates, name
    assert len(CASES) > 300


@pytest.mark.parametrize("case", _ordered())
def test_case(case):
    params = _apply(case)
    text, exp = case["input"], case["expect"]
    expected = _norm(exp["content"], exp["reasoning_content"], exp["tool_calls"])

    # whole (test_peg_parser: `if (!tc.is_partial) assert_msg_equals(tc.expect, parser.parse(tc.input, false))`)
    if not case["is_partial"]:
        assert _of(params.make_parser().parse(text)) == expected

    # streamed: every prefix (whole characters), the deltas accumulated as a client does; ids as parsed (the
    # C++ test parses without llama-server's id assignment)
    parser = params.make_parser(assign_tool_call_ids=False)
    content = reasoning = ""
    calls: list[dict] = []
    for i in range(1, len(text) + 1):
        is_partial = i < len(text) or case["is_partial"]
        current, deltas = parser.update(text[i - 1], is_partial=is_partial)
        for d in deltas:
            content += d.content_delta
            reasoning += d.reasoning_content_delta
            if d.tool_call_index is not None:
                while len(calls) <= d.tool_call_index:
                    calls.append({"name": "", "arguments": "", "id": ""})
                c = calls[d.tool_call_index]
                c["name"] = d.tool_call.name or c["name"]
                c["id"] = d.tool_call.id or c["id"]
                c["arguments"] += d.tool_call.arguments
        assert _norm(content, reasoning, calls) == _of(current), f"after {text[:i]!r}"
    assert _norm(content, reasoning, calls) == expected

    _check_grammar(case, params)

    if case["expect_reconstruction"] and not case["is_partial"]:
        parsed = params.make_parser().parse(text)
        reply = {"role": "assistant", "content": exp["content"]}
        if exp["reasoning_content"]:
            reply["reasoning_content"] = exp["reasoning_content"]
        if exp["tool_calls"]:
            reply["tool_calls"] = [{"type": "function", **({"id": c["id"]} if c["id"] else {}),
                                    "function": {"name": c["name"], "arguments": p.arguments}}
                                   for c, p in zip(exp["tool_calls"], parsed.tool_calls)]
        again = _apply(case, messages=case["params"]["messages"] + [reply], add_generation_prompt=False)
        assert again.prompt.startswith(params.prompt + text)


def _check_grammar(case: dict, params: ChatParams) -> None:
    """test_peg_parser's grammar check: a json_schema gives an eager grammar; a lazy grammar's trigger fires
    on an output with tool calls; the grammar admits the output from where it applies (the earliest trigger,
    not before the generation prompt's end; everything, generation prompt included, for an eager grammar).
    Word triggers of a template with a thinking block are looked for outside it only (the reasoning budget
    sampler holds the grammar back there), unless that finds none for an output with tool calls."""
    if case["params"]["json_schema"] is not None:
        assert params.grammar and not params.grammar_lazy
    if not params.grammar:
        return
    gen, text, exp = params.generation_prompt, case["input"], case["expect"]
    full = gen + text
    triggers = params.grammar_triggers
    earliest = None
    budget_path = params.grammar_lazy and bool(params.thinking_end_tags) and all(t.type == "word" for t in triggers)
    if budget_path:
        start, ends, thinking, i = params.thinking_start_tag, params.thinking_end_tags, False, 0
        while i < len(full):
            if not thinking and start and full.startswith(start, i):
                thinking, i = True, i + len(start)
                continue
            if thinking:
                end = next((e for e in ends if full.startswith(e, i)), None)
                if end is not None:
                    thinking, i = False, i + len(end)
                else:
                    i += 1
                continue
            hits = [i for t in triggers if full.startswith(t.value, i)]
            if hits:
                earliest = i
                break
            i += 1
        if earliest is None and exp["tool_calls"]:
            budget_path = False   # tool calls inside the thinking block (Kimi): the plain search below
    if not budget_path:
        for t in triggers:
            pos = None
            if t.type == "word":
                pos = full.find(t.value)
                pos = None if pos < 0 else pos
            elif t.type == "pattern":
                m = re.search(t.value, full)
                if m is not None:
                    pos = m.start(m.re.groups) if m.start(m.re.groups) >= 0 else None
            elif t.type == "pattern_full":
                rx = re.compile(t.value)
                for end in range(len(gen), len(full) + 1):
                    m = rx.fullmatch(full[:end])
                    if m is not None:
                        pos = next((m.start(g) for g in range(1, rx.groups + 1) if m.group(g)), m.start(0))
                        break
            else:
                raise AssertionError(f"trigger type {t.type} in a case of test-chat.cpp")
            if pos is not None and (earliest is None or pos < earliest):
                earliest = pos
    if params.grammar_lazy and exp["tool_calls"] and not case["is_partial"]:
        assert earliest is not None, f"the grammar trigger did not fire on {full!r}: {triggers}"
    if earliest is not None:
        constrained, applies = full[max(earliest, len(gen)):], True
    else:
        constrained, applies = full, not params.grammar_lazy
    if applies and not case["is_partial"]:
        m = grammar_match(params.grammar, constrained)
        assert m.matched, (m, constrained)
