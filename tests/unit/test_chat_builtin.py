"""llama.cpp's built-in chat formats never lose a message's text silently.

``llama_chat_apply_template`` takes C strings (text after a NUL would vanish) and each format places only the
roles it knows where it knows them (gemma folds a system message into the next user turn, so a lone one
vanished; deepseek, vicuna and others drop 'tool' and 'developer'). pyllm renders every message's text or
raises a ChatTemplateError naming the message.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyllm.chat import ChatTemplate, builtin_templates
from pyllm.errors import ChatTemplateError

BUILTINS = builtin_templates()
ROLES = ("system", "developer", "user", "assistant", "tool")
C_SPACE = " \t\n\v\f\r"   # what the formats' trim() removes (C isspace)


def _builtin(name: str) -> ChatTemplate:
    return ChatTemplate(source=f"llama.cpp built-in {name!r}", builtin=name)


def _in_order(rendered: str, texts: list[str]) -> bool:
    at = 0
    for text in texts:
        i = rendered.find(text, at)
        if i < 0:
            return False
        at = i + len(text)
    return True


text = st.text(st.sampled_from("abcxyz .,!?\n\x00é中"), min_size=1, max_size=12)
message = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": text})


@settings(max_examples=600, deadline=None, derandomize=True)
@given(name=st.sampled_from(BUILTINS), messages=st.lists(message, min_size=1, max_size=5),
       add_generation_prompt=st.booleans())
def test_every_builtin_renders_all_text_or_names_the_message(name, messages, add_generation_prompt):
    try:
        out = _builtin(name).render(messages, add_generation_prompt=add_generation_prompt)
    except ChatTemplateError as exc:
        msg = str(exc)
        i = int(msg.split("message ", 1)[1].split(" ", 1)[0])   # "message {i} ..."
        m = messages[i]
        assert f"'{m['role']}'" in msg and f"{name!r}" in msg, msg
        if "NUL" in msg:
            assert "\x00" in m["content"] and all("\x00" not in x["content"] for x in messages[:i])
        else:
            assert "would be dropped" in msg and m["content"].strip(C_SPACE), msg
        return
    assert "\x00" not in "".join(m["content"] for m in messages)
    assert _in_order(out, [m["content"].strip(C_SPACE) for m in messages]), (name, messages, out)


@pytest.mark.parametrize("name,messages,why", [
    ("gemma", [{"role": "system", "content": "Be brief."}], "none follows"),
    ("gemma", [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."}], "none follows"),
    ("deepseek", [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "42"}], "no place for that role"),
    ("vicuna", [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "no place"),
])
def test_a_dropped_message_is_named_with_the_reason(name, messages, why):
    i = next(j for j, m in enumerate(messages) if m["role"] != "user")
    with pytest.raises(ChatTemplateError, match=rf"message {i} \(role '{messages[i]['role']}'\) would be dropped "
                                                rf"by llama.cpp's built-in '{name}' chat format .*{why}"):
        _builtin(name).render(messages)


def test_system_then_user_is_rendered_by_gemma():
    out = _builtin("gemma").render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert out == "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_empty_messages_a_format_leaves_out_are_no_loss():
    out = _builtin("gemma").render([{"role": "user", "content": "Hi"}, {"role": "system", "content": " "}])
    assert out == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_nul_is_refused_naming_the_message_and_field():
    with pytest.raises(ChatTemplateError,
                       match=r"message 1 \('user'\) has a NUL character in its content \(at index 2\)"):
        _builtin("chatml").render([{"role": "user", "content": "ok"}, {"role": "user", "content": "ab\x00cd"}])
    with pytest.raises(ChatTemplateError, match=r"message 0 \('us\\x00er'\) has a NUL character in its role"):
        _builtin("chatml").render([{"role": "us\x00er", "content": "ab"}])
