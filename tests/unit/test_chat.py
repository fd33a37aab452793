"""Chat templates rendered as Hugging Face renders them, checked against each model's documented format.

Expected strings are written from the model cards / prompt-format docs (and, for the inline Jinja cases,
copied from llama.cpp's tests/test-chat-template.cpp in the pinned source), never from pyllm's output.
"""
from __future__ import annotations

import json
from datetime import datetime

import pytest

from pyllm import chat
from pyllm.chat import ChatTemplate, ReasoningParser, reasoning_parser_for, resolve_template, split_reasoning
from pyllm.errors import ChatTemplateError

pytestmark = pytest.mark.skipif(chat.templates_dir() is None, reason="llama.cpp's models/templates not available")

SYS = [{"role": "system", "content": "You are a helpful assistant"}]
TWO_TURNS = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Who are you"},
]
WITH_REASONING = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there", "reasoning_content": "The user greets me."},
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_CALL = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
]


def render(name, messages, **kw):
    return resolve_template(name).render(messages, **kw)


# ---- shipped templates: the documented formats --------------------------------------------------------
def test_glm_4_7_flash():
    t = "GLM-4.7-Flash"
    assert render(t, SYS + TWO_TURNS) == (
        "[gMASK]<sop><|system|>You are a helpful assistant<|user|>Hello<|assistant|></think>Hi there"
        "<|user|>Who are you<|assistant|><think>")
    # thinking off: the generation prompt closes the block
    assert render(t, TWO_TURNS, enable_thinking=False).endswith("<|user|>Who are you<|assistant|></think>")
    # the reasoning of the turn after the last user message is kept
    assert render(t, WITH_REASONING, add_generation_prompt=False) == (
        "[gMASK]<sop><|user|>Hello<|assistant|><think>The user greets me.</think>Hi there")
    out = render(t, TOOL_CALL, tools=TOOLS, add_generation_prompt=False)
    assert out.startswith("[gMASK]<sop><|system|>\n# Tools\n\nYou may call one or more functions")
    assert "<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) + "\n</tools>" in out
    # trim_blocks eats the newline after each block tag, so the call follows </think> directly
    assert out.endswith("<|user|>Weather in Paris?<|assistant|></think>"
                        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>")


def test_glm4_name_uses_the_shipped_glm_template_without_a_model():
    t = resolve_template("glm4")
    assert "GLM-4.7-Flash" in t.source
    assert t.render(TWO_TURNS).endswith("<|assistant|><think>")


def test_qwen3():
    t = "Qwen-Qwen3-0.6B"
    chatml = ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
              "<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\nWho are you<|im_end|>\n"
              "<|im_start|>assistant\n")
    assert render(t, SYS + TWO_TURNS) == chatml
    assert render(t, SYS + TWO_TURNS, enable_thinking=False) == chatml + "<think>\n\n</think>\n\n"
    assert render(t, WITH_REASONING, add_generation_prompt=False) == (
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<think>\nThe user greets me.\n</think>\n\n"
        "Hi there<|im_end|>\n")
    out = render(t, [TOOL_CALL[0]], tools=TOOLS)
    assert out.startswith("<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user "
                          "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n"
                          "<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>")
    assert out.endswith("<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n")


def test_qwen2_5_default_system_prompt():
    assert render("Qwen-Qwen2.5-7B-Instruct", TWO_TURNS[:1]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")


def test_llama_3_1():
    out = resolve_template("meta-llama-Llama-3.1-8B-Instruct").render(
        SYS + TWO_TURNS, bos_token="<|begin_of_text|>")
    assert out == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "You are a helpful assistant<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWho are you<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_llama_3_2_uses_strftime_now():
    out = render("meta-llama-Llama-3.2-3B-Instruct", SYS + TWO_TURNS[:1], bos_token="<|begin_of_text|>")
    today = datetime.now().strftime("%d %b %Y")
    assert out == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        f"Cutting Knowledge Date: December 2023\nToday Date: {today}\n\n"
        "You are a helpful assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_mistral_nemo():
    # llama.cpp's test-chat-template.cpp, "Mistral-Nemo-Instruct-2407" (jinja): the system prompt goes
    # into the last user turn.
    assert render("mistralai-Mistral-Nemo-Instruct-2407", SYS + TWO_TURNS, bos_token="<s>", eos_token="</s>") == (
        "<s>[INST]Hello[/INST]Hi there</s>[INST]You are a helpful assistant\n\nWho are you[/INST]")


def test_mistral_small_3_2_system_prompt_block():
    assert render("Mistral-Small-3.2-24B-Instruct-2506", SYS + TWO_TURNS, bos_token="<s>", eos_token="</s>") == (
        "<s>[SYSTEM_PROMPT]You are a helpful assistant[/SYSTEM_PROMPT][INST]Hello[/INST]Hi there</s>"
        "[INST]Who are you[/INST]")


def test_gemma_2():
    assert render("google-gemma-2-2b-it", TWO_TURNS, bos_token="<bos>") == (
        "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\nHi there<end_of_turn>\n"
        "<start_of_turn>user\nWho are you<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(ChatTemplateError, match=r"google-gemma-2-2b-it\.jinja raised an error: System role not supported"):
        render("google-gemma-2-2b-it", SYS + TWO_TURNS)


def test_gpt_oss_harmony():
    today = datetime.now().strftime("%Y-%m-%d")
    head = ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
            f"Knowledge cutoff: 2024-06\nCurrent date: {today}\n\nReasoning: {{}}\n\n"
            "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>")
    out = render("openai-gpt-oss-120b", SYS + TWO_TURNS)
    assert out == (head.format("medium") + "<|start|>developer<|message|># Instructions\n\nYou are a helpful assistant"
                   "\n\n<|end|><|start|>user<|message|>Hello<|end|><|start|>assistant<|channel|>final<|message|>"
                   "Hi there<|end|><|start|>user<|message|>Who are you<|end|><|start|>assistant")
    assert render("openai-gpt-oss-120b", TWO_TURNS[:1], reasoning_effort="high") == (
        head.format("high") + "<|start|>user<|message|>Hello<|end|><|start|>assistant")


def test_deepseek_r1_distill():
    t = resolve_template("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B")
    kw = dict(bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>")
    msgs = SYS + [TWO_TURNS[0], {"role": "assistant", "content": "<think>greeting</think>Hi there"}, TWO_TURNS[2]]
    assert t.render(msgs, enable_thinking=True, **kw) == (
        "<｜begin▁of▁sentence｜>You are a helpful assistant<｜User｜>Hello<｜Assistant｜>Hi there<｜end▁of▁sentence｜>"
        "<｜User｜>Who are you<｜Assistant｜><think>\n")


def test_deepseek_v3_1_thinking_switch():
    kw = dict(bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>")
    t = resolve_template("deepseek-ai-DeepSeek-V3.1")
    # Non-thinking mode: the model card writes "<｜Assistant｜></think>"; the template this GGUF family
    # ships (and llama.cpp keeps) writes an empty block "<think></think>"; both tell the model not to think.
    assert t.render(SYS + TWO_TURNS[:1], **kw) == (
        "<｜begin▁of▁sentence｜>You are a helpful assistant<｜User｜>Hello<｜Assistant｜><think></think>")
    assert t.render(SYS + TWO_TURNS[:1], thinking=True, **kw).endswith("<｜Assistant｜><think>")


def test_phi_3_5():
    assert render("microsoft-Phi-3.5-mini-instruct", SYS + TWO_TURNS) == (
        "<|system|>\nYou are a helpful assistant<|end|>\n<|user|>\nHello<|end|>\n<|assistant|>\nHi there<|end|>\n"
        "<|user|>\nWho are you<|end|>\n<|assistant|>\n")


def test_content_parts_are_rendered_as_text():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}]
    assert render("GLM-4.7-Flash", msgs) == "[gMASK]<sop><|user|>Hello<|assistant|><think>"


# ---- inline templates from llama.cpp's tests/test-chat-template.cpp (expected_output_jinja) ------------
CONV = [
    {"role": "system", "content": "You are a helpful assistant"}, {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"}, {"role": "user", "content": "Who are you"},
    {"role": "assistant", "content": "   I am an assistant   "}, {"role": "user", "content": "Another question"},
]
LLAMA_CPP_CASES = [
    ("OpenHermes", "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
     "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
     "", "",
     "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>"
     "assistant\nHi there<|im_end|>\n<|im_start|>user\nWho are you<|im_end|>\n<|im_start|>assistant\n   I am an "
     "assistant   <|im_end|>\n<|im_start|>user\nAnother question<|im_end|>\n<|im_start|>assistant\n"),
    ("deepseek-coder (trim_blocks/lstrip_blocks)",
     "{% if not add_generation_prompt is defined %}\n{% set add_generation_prompt = false %}\n{% endif %}\n"
     "{%- set ns = namespace(found=false) -%}\n{%- for message in messages -%}\n    {%- if message['role'] == "
     "'system' -%}\n        {%- set ns.found = true -%}\n    {%- endif -%}\n{%- endfor -%}\n{{bos_token}}{%- if not "
     "ns.found -%}\n{{'You are an AI programming assistant\\n'}}\n{%- endif %}\n{%- for message in messages %}\n"
     "    {%- if message['role'] == 'system' %}\n{{ message['content'] }}\n    {%- else %}\n        {%- if "
     "message['role'] == 'user' %}\n{{'### Instruction:\\n' + message['content'] + '\\n'}}\n        {%- else %}\n"
     "{{'### Response:\\n' + message['content'] + '\\n<|EOT|>\\n'}}\n        {%- endif %}\n    {%- endif %}\n"
     "{%- endfor %}\n{% if add_generation_prompt %}\n{{'### Response:'}}\n{% endif %}",
     "", "",
     "You are a helpful assistant### Instruction:\nHello\n### Response:\nHi there\n<|EOT|>\n### Instruction:\n"
     "Who are you\n### Response:\n   I am an assistant   \n<|EOT|>\n### Instruction:\nAnother question\n"
     "### Response:\n"),
    ("gemma-7b-it (raise_exception path not taken, | trim)",
     "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
     "{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
     "{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
     "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}",
     "", "", None),
    ("AlphaMonarch (bos/eos)",
     "{% for message in messages %}{{bos_token + message['role'] + '\\n' + message['content'] + eos_token + '\\n'}}"
     "{% endfor %}{% if add_generation_prompt %}{{ bos_token + 'assistant\\n' }}{% endif %}",
     "<s>", "</s>",
     "<s>system\nYou are a helpful assistant</s>\n<s>user\nHello</s>\n<s>assistant\nHi there</s>\n<s>user\nWho are "
     "you</s>\n<s>assistant\n   I am an assistant   </s>\n<s>user\nAnother question</s>\n<s>assistant\n"),
    ("ibm-granite-3.0",
     "{%- if tools %}\n    {{- '<|start_of_role|>available_tools<|end_of_role|>\n' }}\n    {%- for tool in tools %}\n"
     "    {{- tool | tojson(indent=4) }}\n    {%- if not loop.last %}\n        {{- '\n\n' }}\n    {%- endif %}\n"
     "    {%- endfor %}\n    {{- '<|end_of_text|>\n' }}\n{%- endif %}\n{%- for message in messages %}\n"
     "    {%- if message['role'] == 'system' %}\n    {{- '<|start_of_role|>system<|end_of_role|>' + message['content']"
     " + '<|end_of_text|>\n' }}\n    {%- elif message['role'] == 'user' %}\n    {{- '<|start_of_role|>user"
     "<|end_of_role|>' + message['content'] + '<|end_of_text|>\n' }}\n    {%- elif message['role'] == 'assistant' %}\n"
     "    {{- '<|start_of_role|>assistant<|end_of_role|>'  + message['content'] + '<|end_of_text|>\n' }}\n"
     "    {%- endif %}\n    {%- if loop.last and add_generation_prompt %}\n    {{- '<|start_of_role|>assistant"
     "<|end_of_role|>' }}\n    {%- endif %}\n{%- endfor %}",
     "", "",
     "<|start_of_role|>system<|end_of_role|>You are a helpful assistant<|end_of_text|>\n<|start_of_role|>user"
     "<|end_of_role|>Hello<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>Hi there<|end_of_text|>\n"
     "<|start_of_role|>user<|end_of_role|>Who are you<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>"
     "   I am an assistant   <|end_of_text|>\n<|start_of_role|>user<|end_of_role|>Another question<|end_of_text|>\n"
     "<|start_of_role|>assistant<|end_of_role|>"),
]


@pytest.mark.parametrize("name,text,bos,eos,expected", LLAMA_CPP_CASES, ids=[c[0] for c in LLAMA_CPP_CASES])
def test_llama_cpp_inline_cases(name, text, bos, eos, expected):
    t = resolve_template(text)
    assert t.source == "template text"
    if expected is None:
        with pytest.raises(ChatTemplateError, match="System role not supported"):
            t.render(CONV, bos_token=bos, eos_token=eos)
        return
    assert t.render(CONV, bos_token=bos, eos_token=eos) == expected


# ---- Hugging Face semantics -----------------------------------------------------------------------------
def test_tojson_accepts_hf_arguments_and_does_not_html_escape():
    t = resolve_template("{{ x | tojson }}|{{ x | tojson(ensure_ascii=True) }}|{{ x | tojson(indent=2, sort_keys=True) }}"
                         "|{{ x | tojson(separators=(',', ':')) }}")
    x = {"b": "é<&>", "a": 1}
    assert t.render([{"role": "user", "content": ""}], x=x) == "|".join([
        json.dumps(x, ensure_ascii=False), json.dumps(x), json.dumps(x, indent=2, sort_keys=True, ensure_ascii=False),
        json.dumps(x, separators=(",", ":"), ensure_ascii=False)])


def test_loop_controls_generation_tag_and_tools_none():
    t = resolve_template("{% for m in messages %}{% if loop.index0 == 1 %}{% continue %}{% endif %}"
                         "{% if loop.index0 == 3 %}{% break %}{% endif %}{% generation %}{{ m.role }};{% endgeneration %}"
                         "{% endfor %}{{ tools is none }}")
    assert t.render(CONV) == "system;assistant;True"


def test_extra_kwargs_reach_the_template():
    t = resolve_template("{{ enable_thinking }} {{ reasoning_effort }} {{ add_generation_prompt }}")
    assert t.render(TWO_TURNS, enable_thinking=False, reasoning_effort="low", add_generation_prompt=False) == "False low False"


def test_sandbox_forbids_python_internals():
    t = resolve_template("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError, match="template text"):
        t.render(TWO_TURNS)
    with pytest.raises(ChatTemplateError, match="sandbox forbids"):
        resolve_template("{% set _ = messages.append(1) %}").render(TWO_TURNS)


# ---- bad templates and bad messages --------------------------------------------------------------------
def test_syntax_error_names_source_and_line():
    with pytest.raises(ChatTemplateError, match=r"chat template template text has a syntax error at line 2: .*endfor"):
        resolve_template("ok\n{% for m in messages %}").render(TWO_TURNS)


def test_syntax_error_in_a_file(tmp_path):
    p = tmp_path / "bad.jinja"
    p.write_text("{{ messages[0] ")
    with pytest.raises(ChatTemplateError, match=r"bad\.jinja has a syntax error at line 1"):
        resolve_template(str(p)).render(TWO_TURNS)


def test_raise_exception_message():
    with pytest.raises(ChatTemplateError, match=r"raised an error: Only user and assistant roles are supported!"):
        render("{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}"
               "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",
               [{"role": "narrator", "content": "x"}])


@pytest.mark.parametrize("text", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",   # no output, never ends
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",  # huge output
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",                                # infinite recursion
    "{{ 'x' * 10**12 }}",                                                                 # one huge string
])
def test_runaway_templates_are_stopped(text):
    with pytest.raises(ChatTemplateError, match="template text (was stopped|failed)"):
        resolve_template(text).render(TWO_TURNS, seconds=2.0)


@pytest.mark.parametrize("messages,match", [
    ("hello", r"messages is a str; expected a list"),
    ([], r"messages is empty"),
    (["hello"], r"message 0 is 'hello' \(a str\); expected a dict"),
    ([{"content": "x"}], r"message 0 has role=None; expected a non-empty str"),
    ([{"role": "user", "content": 5}], r"message 0 \(user\) has content of type int"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], r"content part 0 .*expected \{'type': 'text'"),
    ([{"role": "user"}], r"message 0 \(user\) has no 'content'"),
])
def test_bad_messages(messages, match):
    with pytest.raises(ChatTemplateError, match=match):
        render("GLM-4.7-Flash", messages)


def test_unknown_name_lists_close_matches():
    with pytest.raises(ChatTemplateError, match=r"unknown chat template 'glm-4'; did you mean: .*glm4") as ei:
        resolve_template("glm-4")
    assert "\n" not in str(ei.value)


def test_missing_file():
    with pytest.raises(ChatTemplateError, match=r"chat template file not found: .*nope\.jinja"):
        resolve_template("/no/such/nope.jinja")


def test_names():
    names = chat.available_templates()
    assert names[0] == "glm4"
    for n in ("GLM-4.7-Flash", "Qwen3.5-4B", "openai-gpt-oss-120b", "chatml", "gemma", "llama3"):
        assert n in names
    assert len(set(names)) == len(names)
    assert resolve_template("qwen3.5-4b").source == "Qwen3.5-4B.jinja"    # case-insensitive
    assert resolve_template("chatml").builtin == "chatml"


def test_builtin_name_renders_with_llama_cpp_and_rejects_tools():
    t = resolve_template("chatml")
    assert t.render(SYS + TWO_TURNS[:1]) == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\n")
    with pytest.raises(ChatTemplateError, match="has no tools"):
        t.render(TWO_TURNS, tools=TOOLS)


def test_installed_templates_are_found_first(tmp_path, monkeypatch):
    (tmp_path / "Mine.jinja").write_text("mine")
    monkeypatch.setattr(chat, "_PACKAGE_TEMPLATES", tmp_path)
    assert chat.templates_dir() == tmp_path
    assert resolve_template("Mine").render(TWO_TURNS) == "mine"


# ---- reasoning split -------------------------------------------------------------------------------------
def _feed_all(parser, chunks):
    out = []
    for c in chunks:
        out += parser.feed(c)
    out += parser.finish()
    merged = []
    for k, t in out:
        if merged and merged[-1][0] == k:
            merged[-1] = (k, merged[-1][1] + t)
        else:
            merged.append((k, t))
    return merged


@pytest.mark.parametrize("text,starts_in,expected", [
    ("<think>\nplan\n</think>\n\nAnswer.", False, [("reasoning", "plan\n"), ("content", "Answer.")]),
    ("plan</think>Answer.", True, [("reasoning", "plan"), ("content", "Answer.")]),
    ("Just an answer with <think> inside.", False, [("content", "Just an answer with <think> inside.")]),
    ("still thinking", True, [("reasoning", "still thinking")]),
    ("a < b </thin", True, [("reasoning", "a < b </thin")]),
])
def test_reasoning_parser_any_split(text, starts_in, expected):
    assert _feed_all(ReasoningParser(starts_in_reasoning=starts_in), [text]) == expected
    for i in range(1, len(text)):                        # every two-piece split, tags cut anywhere
        assert _feed_all(ReasoningParser(starts_in_reasoning=starts_in), [text[:i], text[i:]]) == expected
    assert _feed_all(ReasoningParser(starts_in_reasoning=starts_in), list(text)) == expected   # one char a piece


def test_split_reasoning():
    assert split_reasoning("<think> a </think> b ") == ("a", "b")
    assert split_reasoning("a</think>b", starts_in_reasoning=True) == ("a", "b")
    assert split_reasoning("no tags") == ("", "no tags")


def test_reasoning_parser_for_prompts():
    glm = resolve_template("GLM-4.7-Flash")
    p = reasoning_parser_for(glm.render(TWO_TURNS), glm)
    assert p is not None and p.in_reasoning
    p = reasoning_parser_for(glm.render(TWO_TURNS, enable_thinking=False), glm)
    assert p is not None and not p.in_reasoning
    qwen = resolve_template("Qwen-Qwen3-0.6B")
    p = reasoning_parser_for(qwen.render(TWO_TURNS), qwen)
    assert p is not None and not p.in_reasoning            # Qwen3 opens <think> itself
    r1 = resolve_template("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B")
    assert reasoning_parser_for(r1.render(TWO_TURNS, enable_thinking=True), r1).in_reasoning
    llama = resolve_template("meta-llama-Llama-3.1-8B-Instruct")
    assert reasoning_parser_for(llama.render(TWO_TURNS), llama) is None
    assert isinstance(llama, ChatTemplate)
