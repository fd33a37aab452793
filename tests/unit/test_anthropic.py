"""The Anthropic Messages API layer (pyllm.server.anthropic): request translation to a chat request,
refusals by field path, the chat result and chat stream in Anthropic's shapes, and, when the official
``anthropic`` client is installed, that client reading what this layer writes (and writing what it reads).

llama-server's pinned suite (tools/server/tests/unit/test_compat_anthropic.py) is the behaviour reference;
the cases taken from it say so.
"""
from __future__ import annotations

import importlib
import json

import pytest

from pyllm.server.anthropic import (AnthropicError, AnthropicStream, anthropic_to_chat, chat_to_anthropic,
                                    count_tokens_response, count_tokens_to_chat, from_openai_error,
                                    normalize_billing_header, sse_event, stop_reason_of)

WEATHER = {"name": "get_weather", "description": "Get the current weather in a location",
           "input_schema": {"type": "object", "properties": {"location": {"type": "string"}},
                            "required": ["location"]}}


def _body(**kw) -> dict:
    return {"model": "test", "max_tokens": 50, "messages": [{"role": "user", "content": "Hello"}], **kw}


def _refused(body, path: str, *fragments: str, count: bool = False) -> AnthropicError:
    with pytest.raises(AnthropicError) as info:
        (count_tokens_to_chat if count else anthropic_to_chat)(body)
    err = info.value
    assert err.status == 400 and err.type == "invalid_request_error"
    assert err.param == path and err.message.startswith(f"{path}: "), err.message
    for f in fragments:
        assert f in err.message, err.message
    assert err.body() == {"type": "error", "error": {"type": "invalid_request_error", "message": err.message}}
    return err


# ---------------------------------------------------------------------------------------------------------
# request translation
# ---------------------------------------------------------------------------------------------------------

def test_basic_request_translates_to_chat():
    assert anthropic_to_chat(_body()) == {"model": "test", "max_tokens": 50,
                                          "messages": [{"role": "user", "content": "Hello"}]}


def test_system_string_and_text_blocks_become_a_first_system_message():
    chat = anthropic_to_chat(_body(system="You are a helpful assistant."))
    assert chat["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
    # llama-server joins the system text blocks without a separator; cache_control changes nothing
    chat = anthropic_to_chat(_body(system=[{"type": "text", "text": "A."},
                                           {"type": "text", "text": " B.", "cache_control": {"type": "ephemeral"}}]))
    assert chat["messages"] == [{"role": "system", "content": "A. B."}, {"role": "user", "content": "Hello"}]


def test_claude_code_billing_header_stamp_is_normalized_as_llama_server_does():
    stamped = ("x-anthropic-billing-header: cc_version=2.1.101.e51; cc_entrypoint=cli; cch=a5145;"
               "You are Claude Code, Anthropic's official CLI for Claude.")
    want = stamped.replace("cch=a5145;", "cch=fffff;")
    assert normalize_billing_header(stamped) == want
    assert anthropic_to_chat(_body(system=stamped))["messages"][0]["content"] == want
    assert anthropic_to_chat(_body(system=[{"type": "text", "text": stamped}]))["messages"][0]["content"] == want
    # anything else is untouched: not at the start, no cch=, a stamp that is not 5 characters then ';'
    for text in ("say x-anthropic-billing-header: cch=a5145;", "x-anthropic-billing-header: cc_version=1;",
                 "x-anthropic-billing-header: cch=a51;x", "x-anthropic-billing-header: cch=a5145"):
        assert normalize_billing_header(text) == text


def test_multipart_text_content_keeps_its_parts():
    # test_anthropic_messages_multipart_content
    chat = anthropic_to_chat(_body(messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is"},
        {"type": "text", "text": " the answer?", "cache_control": {"type": "ephemeral"}}]}]))
    assert chat["messages"] == [{"role": "user", "content": [{"type": "text", "text": "What is"},
                                                             {"type": "text", "text": " the answer?"}]}]


def test_conversation_keeps_roles_and_order():
    msgs = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there!"},
            {"role": "user", "content": "How are you?"}]
    assert anthropic_to_chat(_body(messages=msgs))["messages"] == msgs


def test_a_turn_with_nothing_in_it_is_no_message():
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": []},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "", "signature": ""}]}]
    assert anthropic_to_chat(_body(messages=msgs))["messages"] == [{"role": "user", "content": "Hi"}]


def test_empty_messages_are_passed_on_as_llama_server_does():
    # test_anthropic_empty_messages: llama-server accepts them; the chat path decides what an empty one renders
    assert anthropic_to_chat(_body(messages=[]))["messages"] == []


def test_max_tokens_is_required_on_messages_and_validated():
    body = _body()
    del body["max_tokens"]
    _refused(body, "max_tokens", "is required")
    _refused(_body(max_tokens=-1), "max_tokens", "minimum, 0")
    _refused(_body(max_tokens=True), "max_tokens", "integer")
    _refused(_body(max_tokens="50"), "max_tokens", "integer")
    _refused(_body(max_tokens=5.0), "max_tokens", "integer")
    # 0: Anthropic's "fill the prompt cache, generate nothing" is llama-server's n_predict 0
    chat = anthropic_to_chat(_body(max_tokens=0))
    assert chat["n_predict"] == 0 and "max_tokens" not in chat


def test_count_tokens_takes_the_same_fields_without_max_tokens():
    # test_anthropic_count_tokens_no_max_tokens
    body = {"model": "test", "system": "Be brief.", "messages": [{"role": "user", "content": "Hello world"}],
            "tools": [WEATHER]}
    chat = count_tokens_to_chat(body)
    assert "max_tokens" not in chat and "n_predict" not in chat
    assert chat["messages"][0] == {"role": "system", "content": "Be brief."}
    assert chat["tools"][0]["function"]["name"] == "get_weather"
    assert count_tokens_to_chat({**body, "max_tokens": 9})["max_tokens"] == 9
    _refused({**body, "max_tokens": "9"}, "max_tokens", count=True)
    _refused({"model": "test"}, "messages", "is required", count=True)
    assert count_tokens_response(12) == {"input_tokens": 12}
    with pytest.raises(ValueError, match="n_tokens"):
        count_tokens_response(-1)


def test_messages_are_required_and_shaped():
    _refused({"model": "test", "max_tokens": 5}, "messages", "is required")   # test_anthropic_missing_messages
    _refused(_body(messages="Hello"), "messages", "array")
    _refused(_body(messages=["Hello"]), "messages[0]", "object")
    _refused(_body(messages=[{"role": "system", "content": "x"}]), "messages[0].role", "top-level 'system'")
    _refused(_body(messages=[{"role": "tool", "content": "x"}]), "messages[0].role", "user, assistant")
    _refused(_body(messages=[{"role": "user"}]), "messages[0].content", "is required")
    _refused(_body(messages=[{"role": "user", "content": 5}]), "messages[0].content", "a number")
    _refused(_body(messages=[{"role": "user", "content": "x", "name": "bob"}]), "messages[0].name")
    _refused(_body(messages=[{"role": "user", "content": [{"text": "no type"}]}]), "messages[0].content[0].type")
    _refused(_body(messages=[{"role": "user", "content": [{"type": "text", "text": 3}]}]),
             "messages[0].content[0].text", "string")
    _refused(_body(messages=[{"role": "user", "content": [{"type": "text", "text": "a", "citations": [{"x": 1}]}]}]),
             "messages[0].content[0].citations")


@pytest.mark.parametrize("block,why", [
    ({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}, "text-only"),
    ({"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}, "text-only"),
    ({"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}, "text-only"),
    ({"type": "search_result", "source": "s", "title": "t", "content": []}, "not supported"),
    ({"type": "redacted_thinking", "data": "EmwKAhgB"}, "encrypted"),
    ({"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}, "server tools"),
    ({"type": "video"}, "not a content block type"),
])
def test_blocks_this_server_cannot_read_are_refused_by_path(block, why):
    role = "assistant" if block["type"] in ("redacted_thinking", "server_tool_use") else "user"
    msgs = [{"role": "user", "content": "Hi"}, {"role": role, "content": [{"type": "text", "text": "x"}, block]}]
    err = _refused(_body(messages=msgs), "messages[1].content[1]" + (".type" if block["type"] == "video" else ""), why)
    assert repr(block["type"]) in err.message


def test_image_inside_a_tool_result_is_refused():
    # test_anthropic_tool_result_with_image: llama-server fails later (no projector); here the field is named
    msgs = [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "tool_1", "content": [
        {"type": "text", "text": "File: test.png"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]}]
    _refused(_body(messages=msgs), "messages[0].content[0].content[1]", "text-only")


def test_tool_use_becomes_assistant_tool_calls_with_arguments_as_json_text():
    tool_input = {"location": "Paris", "units": ["°C"], "n": 2}
    msgs = [{"role": "user", "content": "What's the weather?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "test123", "name": "get_weather",
                                               "input": tool_input}]}]
    assistant = anthropic_to_chat(_body(messages=msgs))["messages"][1]
    assert assistant == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "test123", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"location":"Paris","units":["°C"],"n":2}'}}]}
    assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == tool_input


def test_tool_use_fields_are_checked():
    def use(**kw):
        block = {"type": "tool_use", "id": "t1", "name": "f", "input": {}, **kw}
        return _body(messages=[{"role": "assistant", "content": [{k: v for k, v in block.items() if v is not None}]}])
    _refused(use(input="{}"), "messages[0].content[0].input", "object")
    _refused(use(input=None), "messages[0].content[0].input", "object")
    _refused(use(id=None), "messages[0].content[0].id", "string")
    _refused(use(name=7), "messages[0].content[0].name", "string")
    _refused(use(caller={"type": "code_execution_20250825", "tool_id": "x"}), "messages[0].content[0].caller")
    assert anthropic_to_chat(use(caller={"type": "direct"}))["messages"][0]["tool_calls"][0]["id"] == "t1"


def test_tool_result_becomes_a_tool_message():
    # test_anthropic_tool_result, test_anthropic_tool_result_error (is_error: the text is what the model sees)
    for extra in ({}, {"is_error": True}, {"is_error": False}):
        msgs = [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "test123",
                                              "content": "The weather is sunny, 25°C", **extra}]}]
        assert anthropic_to_chat(_body(messages=msgs))["messages"] == [
            {"role": "tool", "tool_call_id": "test123", "content": "The weather is sunny, 25°C"}]
    # text blocks are joined (llama-server collapses them to one string); no content is the empty result
    msgs = [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "a", "content": [{"type": "text", "text": "main.py"},
                                                                {"type": "text", "text": "\nutils.py"}]},
        {"type": "tool_result", "tool_use_id": "b"}]}]
    assert anthropic_to_chat(_body(messages=msgs))["messages"] == [
        {"role": "tool", "tool_call_id": "a", "content": "main.py\nutils.py"},
        {"role": "tool", "tool_call_id": "b", "content": ""}]
    _refused(_body(messages=[{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a",
                                                           "is_error": "yes"}]}]),
             "messages[0].content[0].is_error", "true or false")
    _refused(_body(messages=[{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]),
             "messages[0].content[0].tool_use_id", "string")
    _refused(_body(messages=[{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a",
                                                           "content": {"text": "x"}}]}]),
             "messages[0].content[0].content", "an object")


def test_tool_results_come_before_the_turns_text():
    # test_anthropic_tool_result_with_text sends the text first: the results still follow the tool call
    msgs = [{"role": "user", "content": "What's the weather?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "tool_1", "name": "get_weather",
                                               "input": {"location": "Paris"}}]},
            {"role": "user", "content": [{"type": "text", "text": "Here are the results:"},
                                         {"type": "tool_result", "tool_use_id": "tool_1", "content": "Sunny, 25°C"}]}]
    out = anthropic_to_chat(_body(messages=msgs))["messages"]
    assert [m["role"] for m in out] == ["user", "assistant", "tool", "user"]
    assert out[2] == {"role": "tool", "tool_call_id": "tool_1", "content": "Sunny, 25°C"}
    assert out[3] == {"role": "user", "content": [{"type": "text", "text": "Here are the results:"}]}


def test_blocks_in_the_wrong_role_are_refused():
    _refused(_body(messages=[{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}]}]),
             "messages[0].content[0].type", "assistant message")
    _refused(_body(messages=[{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "a"}]}]),
             "messages[0].content[0].type", "user message")
    _refused(_body(messages=[{"role": "user", "content": [{"type": "thinking", "thinking": "hm", "signature": ""}]}]),
             "messages[0].content[0].type", "assistant message")


def test_thinking_blocks_in_history_become_reasoning_content():
    # test_anthropic_thinking_history_in_count_tokens: thinking next to a tool call is not dropped
    msgs = [{"role": "user", "content": "Fix the bug"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "I should check the project structure first.", "signature": "sig=="},
                {"type": "tool_use", "id": "call_1", "name": "list_files", "input": {"path": "."}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "main.py"}]}]
    out = count_tokens_to_chat({"model": "test", "messages": msgs})["messages"]
    assert out[1] == {"role": "assistant", "content": "",
                      "reasoning_content": "I should check the project structure first.",
                      "tool_calls": [{"id": "call_1", "type": "function",
                                      "function": {"name": "list_files", "arguments": '{"path":"."}'}}]}
    _refused(_body(messages=[{"role": "assistant", "content": [{"type": "thinking", "thinking": None}]}]),
             "messages[0].content[0].thinking", "string")


def test_a_whole_tool_loop_history():
    msgs = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Two cities: ", "signature": ""},
            {"type": "thinking", "thinking": "two calls.", "signature": ""},
            {"type": "text", "text": "Checking both."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"location": "Rome"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18°C"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "City not found"}],
             "is_error": True}]},
        {"role": "assistant", "content": "Paris is 18°C; Rome failed."},
        {"role": "user", "content": [{"type": "text", "text": "Thanks"}]},
    ]
    chat = anthropic_to_chat(_body(messages=msgs, tools=[WEATHER], system="Use tools."))
    assert chat["messages"] == [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Checking both."}],
         "reasoning_content": "Two cities: two calls.",
         "tool_calls": [{"id": "toolu_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'}},
                        {"id": "toolu_2", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"location":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18°C"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "City not found"},
        {"role": "assistant", "content": "Paris is 18°C; Rome failed."},
        {"role": "user", "content": [{"type": "text", "text": "Thanks"}]},
    ]
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a location",
        "parameters": WEATHER["input_schema"]}}]


def test_translations_are_valid_chat_requests():
    """What the chat endpoint validates (strictly, from JSON, as pyllm.server.responses hands its requests on)."""
    from pyllm.server.schemas import ChatCompletionRequest

    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": ""},
                                              {"type": "text", "text": "x"},
                                              {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                               "input": {"location": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18"},
                                         {"type": "text", "text": "ok"}]}]
    for extra in ({}, {"max_tokens": 0}, {"stream": True, "temperature": 1, "top_p": 0.9, "top_k": 4, "seed": 3},
                  {"tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}},
                  {"thinking": {"type": "enabled", "budget_tokens": 2000}, "stop_sequences": ["a"]}):
        chat = anthropic_to_chat(_body(messages=msgs, system="s", tools=[WEATHER], **extra))
        req = ChatCompletionRequest.model_validate_json(json.dumps(chat))
        assert [m.role for m in req.messages] == ["system", "user", "assistant", "tool", "user"]
        assert req.tools == chat["tools"] and (req.max_tokens, req.n_predict) == (chat.get("max_tokens"),
                                                                                  chat.get("n_predict"))


def test_tools_translate_and_server_tools_are_refused():
    tools = [WEATHER, {"name": "noop", "input_schema": {"type": "object"}, "type": "custom",
                       "cache_control": {"type": "ephemeral"}},
             {"name": "strict_one", "input_schema": {"type": "object"}, "strict": True}]
    out = anthropic_to_chat(_body(tools=tools))["tools"]
    # llama-server passes an empty description when there is none
    assert out[1] == {"type": "function", "function": {"name": "noop", "description": "",
                                                       "parameters": {"type": "object"}}}
    assert out[2]["function"]["strict"] is True
    _refused(_body(tools=[{"type": "web_search_20250305", "name": "web_search"}]), "tools[0].type", "server tools")
    _refused(_body(tools=[{"type": "bash_20250124", "name": "bash"}]), "tools[0].type", "server tools")
    _refused(_body(tools=[{"name": "f"}]), "tools[0].input_schema", "object")
    _refused(_body(tools=[{"input_schema": {}}]), "tools[0].name", "string")
    _refused(_body(tools=[{**WEATHER, "input_examples": [{}]}]), "tools[0].input_examples")
    _refused(_body(tools={"name": "f"}), "tools", "array")


@pytest.mark.parametrize("choice,want", [
    ({"type": "auto"}, {"tool_choice": "auto"}),
    ({"type": "any"}, {"tool_choice": "required"}),
    ({"type": "none"}, {"tool_choice": "none"}),
    ({"type": "tool", "name": "get_weather"},
     {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    ({"type": "auto", "disable_parallel_tool_use": True}, {"tool_choice": "auto", "parallel_tool_calls": False}),
    ({"type": "any", "disable_parallel_tool_use": False}, {"tool_choice": "required"}),
    ({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
     {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "parallel_tool_calls": False}),
])
def test_tool_choice(choice, want):
    chat = anthropic_to_chat(_body(tools=[WEATHER], tool_choice=choice))
    assert {k: chat[k] for k in ("tool_choice", "parallel_tool_calls") if k in chat} == want


def test_tool_choice_refusals():
    _refused(_body(tool_choice="auto"), "tool_choice", "object")
    _refused(_body(tool_choice={"type": "required"}), "tool_choice.type", "auto, any, tool or none")
    _refused(_body(tool_choice={"type": "tool"}), "tool_choice.name", "string")
    _refused(_body(tool_choice={"type": "none", "disable_parallel_tool_use": True}),
             "tool_choice.disable_parallel_tool_use")
    _refused(_body(tool_choice={"type": "auto", "disable_parallel_tool_use": 1}),
             "tool_choice.disable_parallel_tool_use", "true or false")


def test_sampling_fields_stop_sequences_and_stream():
    chat = anthropic_to_chat(_body(temperature=0.5, top_p=0.9, top_k=40, stream=True, stop_sequences=["\n", "END"]))
    assert (chat["temperature"], chat["top_p"], chat["top_k"], chat["stream"], chat["stop"]) == \
        (0.5, 0.9, 40, True, ["\n", "END"])
    _refused(_body(temperature="0.5"), "temperature", "number")
    _refused(_body(temperature=float("nan")), "temperature", "finite")
    _refused(_body(top_p=True), "top_p", "number")
    _refused(_body(top_k=1.5), "top_k", "integer")
    _refused(_body(stream="yes"), "stream", "true or false")
    _refused(_body(stop_sequences="END"), "stop_sequences", "array")
    _refused(_body(stop_sequences=["END", 3]), "stop_sequences[1]", "string")


def test_llama_server_sampling_extensions_pass_through():
    chat = anthropic_to_chat(_body(seed=7, min_p=0.05, repeat_penalty=1.1, chat_template_kwargs={"foo": 1}))
    assert (chat["seed"], chat["min_p"], chat["repeat_penalty"], chat["chat_template_kwargs"]) == \
        (7, 0.05, 1.1, {"foo": 1})
    _refused(_body(chat_template_kwargs=[1]), "chat_template_kwargs", "object")


def test_thinking_config():
    chat = anthropic_to_chat(_body(max_tokens=2000, thinking={"type": "enabled", "budget_tokens": 1024}))
    assert chat["chat_template_kwargs"] == {"enable_thinking": True} and chat["thinking_budget_tokens"] == 1024
    chat = anthropic_to_chat(_body(thinking={"type": "disabled"}))
    assert chat["chat_template_kwargs"] == {"enable_thinking": False} and "thinking_budget_tokens" not in chat
    chat = anthropic_to_chat(_body(thinking={"type": "adaptive", "display": "summarized"}))
    assert chat["chat_template_kwargs"] == {"enable_thinking": True} and "thinking_budget_tokens" not in chat
    # the client's own template kwargs stay; enable_thinking agreeing with thinking is fine
    chat = anthropic_to_chat(_body(thinking={"type": "disabled"},
                                   chat_template_kwargs={"enable_thinking": False, "x": 1}))
    assert chat["chat_template_kwargs"] == {"enable_thinking": False, "x": 1}
    _refused(_body(thinking={"type": "enabled"}), "thinking.budget_tokens", "required")
    _refused(_body(thinking={"type": "enabled", "budget_tokens": 0}), "thinking.budget_tokens", "minimum")
    _refused(_body(thinking={"type": "on"}), "thinking.type", "enabled, disabled or adaptive")
    _refused(_body(thinking={"type": "adaptive", "display": "omitted"}), "thinking.display", "omitted")
    _refused(_body(thinking={"type": "disabled", "budget_tokens": 5}), "thinking.budget_tokens")
    _refused(_body(thinking={"type": "enabled", "budget_tokens": 1024},
                   chat_template_kwargs={"enable_thinking": False}), "thinking.type", "contradicts")


def test_bookkeeping_fields_are_accepted_and_change_nothing():
    # test_anthropic_metadata
    base = anthropic_to_chat(_body())
    assert anthropic_to_chat(_body(metadata={"user_id": "test_user_123"}, service_tier="auto",
                                   cache_control={"type": "ephemeral"}, inference_geo="us", speed="fast",
                                   diagnostics={"previous_message_id": None})) == base
    _refused(_body(metadata="user"), "metadata", "object")


def test_unknown_and_unsupported_top_level_fields_are_refused():
    _refused(_body(frequency_penalty=0.5), "frequency_penalty", "not a field")
    _refused(_body(mcp_servers=[{"type": "url", "url": "https://x", "name": "x"}]), "mcp_servers", "not supported")
    _refused(_body(container="container_1"), "container", "code execution")
    _refused(_body(context_management={"edits": [{"type": "clear_tool_uses_20250919"}]}), "context_management")
    assert anthropic_to_chat(_body(mcp_servers=[])) == anthropic_to_chat(_body())   # the empty list asks nothing
    _refused(_body(model=3), "model", "string")
    with pytest.raises(AnthropicError, match="must be a JSON object, got an array") as info:
        anthropic_to_chat(["not an object"])
    assert info.value.status == 400 and info.value.param is None


def test_output_config():
    chat = anthropic_to_chat(_body(output_config={"effort": "low", "format": {
        "type": "json_schema", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}))
    assert chat["reasoning_effort"] == "low"
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "output", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}, "strict": True}}
    _refused(_body(output_config={"format": {"type": "xml"}}), "output_config.format.type", "json_schema")
    _refused(_body(output_config={"verbosity": "high"}), "output_config.verbosity")


# ---------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("status,kind", [(400, "invalid_request_error"), (401, "authentication_error"),
                                         (403, "permission_error"), (404, "not_found_error"),
                                         (413, "request_too_large"), (429, "rate_limit_error"),
                                         (500, "api_error"), (503, "overloaded_error"), (504, "timeout_error"),
                                         (529, "overloaded_error"),
                                         (422, "invalid_request_error"), (502, "api_error")])
def test_error_types_follow_the_status(status, kind):
    err = AnthropicError(status, "boom")
    assert err.body() == {"type": "error", "error": {"type": kind, "message": "boom"}}
    assert AnthropicError(status, "boom", "api_error").body()["error"]["type"] == "api_error"


def test_openai_errors_map_to_anthropic_paths():
    err = from_openai_error(400, "thinking_budget_tokens=1024 is not supported by this server: a reasoning budget "
                                 "is not implemented", "thinking_budget_tokens")
    assert err.param == "thinking.budget_tokens" and err.message.startswith("thinking.budget_tokens: ")
    assert err.body()["error"]["type"] == "invalid_request_error"
    assert from_openai_error(400, "bad stop", "stop").param == "stop_sequences"
    same = from_openai_error(400, "the chat template rendered an empty prompt", "messages")
    assert same.message == "the chat template rendered an empty prompt" and same.param == "messages"
    busy = from_openai_error(503, "the server is busy", headers={"Retry-After": "1"})
    assert busy.body() == {"type": "error", "error": {"type": "overloaded_error", "message": "the server is busy"}}
    assert busy.headers == {"Retry-After": "1"} and busy.status == 503
    assert from_openai_error(404, "model 'x' does not exist", "model").body()["error"]["type"] == "not_found_error"


# ---------------------------------------------------------------------------------------------------------
# response
# ---------------------------------------------------------------------------------------------------------

def _completion(message: dict, finish: str, completion_tokens: int = 7) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 20, "completion_tokens": completion_tokens, "total_tokens": 20 + completion_tokens}}


def test_text_reply():
    msg = chat_to_anthropic(_completion({"content": "Hello!"}, "stop"), model="m", n_prompt=20, n_cached=16,
                            message_id="msg_1")
    assert msg == {"id": "msg_1", "type": "message", "role": "assistant",
                   "content": [{"type": "text", "text": "Hello!"}],
                   "model": "m", "stop_reason": "end_turn", "stop_sequence": None,
                   "usage": {"cache_read_input_tokens": 16, "input_tokens": 4, "output_tokens": 7}}
    fresh = chat_to_anthropic(_completion({"content": "x"}, "stop"), model="m", n_prompt=1, n_cached=0)
    assert fresh["id"].startswith("msg_") and len(fresh["id"]) > len("msg_")


def test_thinking_text_and_tool_use_blocks_in_order():
    message = {"content": "Let me check.", "reasoning_content": "The user wants weather.",
               "tool_calls": [{"id": "call_a", "type": "function",
                               "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'}},
                              {"id": "call_b", "type": "function", "function": {"name": "now", "arguments": ""}}]}
    msg = chat_to_anthropic(_completion(message, "tool_calls"), model="m", n_prompt=20, n_cached=0)
    assert msg["content"] == [
        {"type": "thinking", "thinking": "The user wants weather.", "signature": ""},
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"location": "Paris"}},
        {"type": "tool_use", "id": "call_b", "name": "now", "input": {}}]
    assert msg["stop_reason"] == "tool_use"
    # llama-server reports tool_use when a stop (EOS) ends a reply that has tool calls
    msg = chat_to_anthropic(_completion(message, "stop"), model="m", n_prompt=20, n_cached=0)
    assert msg["stop_reason"] == "tool_use"


def test_stop_reasons():
    def reason(finish, **kw):
        m = chat_to_anthropic(_completion({"content": "a"}, finish), model="m", n_prompt=3, n_cached=0, **kw)
        return m["stop_reason"], m["stop_sequence"]
    assert reason("stop") == ("end_turn", None)
    assert reason("length") == ("max_tokens", None)
    assert reason("stop", stop_sequence="END") == ("stop_sequence", "END")
    assert reason("length", stop_sequence="END") == ("max_tokens", None)
    with pytest.raises(ValueError, match="content_filter"):
        stop_reason_of("content_filter", has_tool_use=False)


def test_empty_reply_has_no_blocks():
    msg = chat_to_anthropic(_completion({"content": ""}, "length", 0), model="m", n_prompt=5, n_cached=5)
    assert msg["content"] == [] and msg["stop_reason"] == "max_tokens"
    assert msg["usage"] == {"cache_read_input_tokens": 5, "input_tokens": 0, "output_tokens": 0}


def test_tool_arguments_that_are_not_an_object():
    bad = {"content": None, "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": '{"a": 1'}}]}
    # cut by max_tokens: the incomplete call is kept with the empty input, and stop_reason says why
    msg = chat_to_anthropic(_completion(bad, "length"), model="m", n_prompt=1, n_cached=0)
    assert msg["content"] == [{"type": "tool_use", "id": "c", "name": "f", "input": {}}]
    assert msg["stop_reason"] == "max_tokens"
    # a finished call with broken arguments is a server error, never a silent {}
    with pytest.raises(AnthropicError, match="not a JSON object") as info:
        chat_to_anthropic(_completion(bad, "tool_calls"), model="m", n_prompt=1, n_cached=0)
    assert info.value.status == 500 and info.value.type == "api_error"
    with pytest.raises(AnthropicError):
        chat_to_anthropic(_completion({"tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1]"}}]},
                                      "stop"), model="m", n_prompt=1, n_cached=0)


def test_result_forms_and_bad_counts():
    choice = {"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
    msg = chat_to_anthropic(choice, model="m", n_prompt=4, n_cached=1, n_decoded=2)
    assert msg["usage"] == {"cache_read_input_tokens": 1, "input_tokens": 3, "output_tokens": 2}
    with pytest.raises(ValueError, match="n_decoded"):
        chat_to_anthropic(choice, model="m", n_prompt=4, n_cached=1)
    with pytest.raises(ValueError, match="exceeds"):
        chat_to_anthropic(choice, model="m", n_prompt=4, n_cached=5, n_decoded=1)
    with pytest.raises(ValueError, match="n_prompt"):
        chat_to_anthropic(choice, model="m", n_prompt=-1, n_cached=0, n_decoded=1)
    with pytest.raises(ValueError, match="exactly one choice"):
        chat_to_anthropic({"choices": [], "usage": {"completion_tokens": 1}}, model="m", n_prompt=1, n_cached=0)
    with pytest.raises(ValueError, match="function name"):
        chat_to_anthropic({"message": {"tool_calls": [{"id": "x", "function": {"arguments": "{}"}}]},
                           "finish_reason": "stop"}, model="m", n_prompt=1, n_cached=0, n_decoded=1)


# ---------------------------------------------------------------------------------------------------------
# streaming
# ---------------------------------------------------------------------------------------------------------

def _parse(chunks: list[str]) -> list[dict]:
    """The events of SSE text: each ``event: NAME`` line must name its data's ``type``."""
    text = "".join(chunks)
    assert text.endswith("\n\n")
    out = []
    for raw in text[:-2].split("\n\n"):
        lines = raw.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), raw
        data = json.loads(lines[1][len("data: "):])
        assert data["type"] == lines[0][len("event: "):]
        out.append(data)
    return out


def _accumulate(events: list[dict]) -> dict:
    """The message a client builds from the events (Anthropic's streaming rules, strictly: one open block
    at a time, indices in order, deltas of the block's own kind)."""
    message, open_index, partial = None, None, {}
    for ev in events:
        kind = ev["type"]
        if kind == "message_start":
            assert message is None
            message = json.loads(json.dumps(ev["message"]))
        elif kind == "content_block_start":
            assert open_index is None and ev["index"] == len(message["content"])
            message["content"].append(dict(ev["content_block"]))
            open_index = ev["index"]
        elif kind == "content_block_delta":
            assert ev["index"] == open_index
            block, d = message["content"][open_index], ev["delta"]
            want = {"text_delta": "text", "thinking_delta": "thinking", "signature_delta": "thinking",
                    "input_json_delta": "tool_use"}[d["type"]]
            assert block["type"] == want
            if d["type"] == "text_delta":
                block["text"] += d["text"]
            elif d["type"] == "thinking_delta":
                block["thinking"] += d["thinking"]
            elif d["type"] == "signature_delta":
                block["signature"] = d["signature"]
            else:
                partial[open_index] = partial.get(open_index, "") + d["partial_json"]
        elif kind == "content_block_stop":
            assert ev["index"] == open_index
            if open_index in partial:
                message["content"][open_index]["input"] = json.loads(partial[open_index])
            open_index = None
        elif kind == "message_delta":
            assert open_index is None
            message.update(ev["delta"])
            message["usage"].update(ev["usage"])   # cumulative figures replace message_start's
        elif kind == "message_stop":
            pass
        else:
            raise AssertionError(kind)
    return message


def _stream(deltas: list[dict], finish: str, n_decoded: int = 5, **kw) -> list[str]:
    s = AnthropicStream(model="m", n_prompt=10, n_cached=4, message_id="msg_s")
    out = s.start()
    for d in deltas:
        out += s.feed(d)
    out += s.finish(finish, n_decoded=n_decoded, **kw)
    assert s.done
    return out


def test_text_stream_event_sequence():
    # test_anthropic_messages_streaming
    events = _parse(_stream([{"role": "assistant", "content": None}, {"content": "Hel"}, {"content": "lo"}], "stop"))
    assert [e["type"] for e in events] == ["message_start", "content_block_start", "content_block_delta",
                                          "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert events[0]["message"] == {"id": "msg_s", "type": "message", "role": "assistant", "content": [], "model": "m",
                                    "stop_reason": None, "stop_sequence": None,
                                    "usage": {"cache_read_input_tokens": 4, "input_tokens": 6, "output_tokens": 0}}
    assert events[1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert events[2]["delta"] == {"type": "text_delta", "text": "Hel"}
    assert events[5] == {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                         "usage": {"output_tokens": 5}}
    assert _accumulate(events)["content"] == [{"type": "text", "text": "Hello"}]


def test_thinking_then_text_stream():
    events = _parse(_stream([{"reasoning_content": "2+2"}, {"reasoning_content": " is 4."}, {"content": "4"}],
                            "length"))
    kinds = [(e["type"], e.get("index"), (e.get("delta") or e.get("content_block") or {}).get("type")) for e in events]
    assert kinds == [("message_start", None, None),
                     ("content_block_start", 0, "thinking"), ("content_block_delta", 0, "thinking_delta"),
                     ("content_block_delta", 0, "thinking_delta"), ("content_block_delta", 0, "signature_delta"),
                     ("content_block_stop", 0, None),
                     ("content_block_start", 1, "text"), ("content_block_delta", 1, "text_delta"),
                     ("content_block_stop", 1, None), ("message_delta", None, None), ("message_stop", None, None)]
    msg = _accumulate(events)
    assert msg["content"] == [{"type": "thinking", "thinking": "2+2 is 4.", "signature": ""},
                              {"type": "text", "text": "4"}]
    assert msg["stop_reason"] == "max_tokens"


def test_tool_use_stream_deltas_concatenate_to_the_arguments():
    args_a = '{"location": "Paris", "note": "naïve \\"quoted\\""}'
    args_b = '{"x": [1, 2]}'
    deltas = [{"content": "Checking."},
              {"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather"}}]}]
    deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": args_a[i:i + 7]}}]}
               for i in range(0, len(args_a), 7)]
    deltas += [{"tool_calls": [{"index": 1, "id": "call_b", "function": {"name": "f", "arguments": args_b[:3]}}]},
               {"tool_calls": [{"index": 1, "function": {"arguments": args_b[3:]}}]}]
    events = _parse(_stream(deltas, "tool_calls", n_decoded=30))
    starts = [e for e in events if e["type"] == "content_block_start"]
    assert [(e["index"], e["content_block"]) for e in starts] == [
        (0, {"type": "text", "text": ""}),
        (1, {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {}}),
        (2, {"type": "tool_use", "id": "call_b", "name": "f", "input": {}})]
    # test_anthropic_streaming_content_block_indices: every started block is stopped
    assert sorted(e["index"] for e in events if e["type"] == "content_block_stop") == [0, 1, 2]
    pieces = {i: "".join(e["delta"]["partial_json"] for e in events
                         if e["type"] == "content_block_delta" and e["index"] == i) for i in (1, 2)}
    assert pieces == {1: args_a, 2: args_b}
    msg = _accumulate(events)
    assert msg["stop_reason"] == "tool_use" and msg["usage"]["output_tokens"] == 30
    # the stream and the non-streamed reply agree
    full = {"content": "Checking.", "tool_calls": [
        {"id": "call_a", "function": {"name": "get_weather", "arguments": args_a}},
        {"id": "call_b", "function": {"name": "f", "arguments": args_b}}]}
    assert msg == chat_to_anthropic(_completion(full, "tool_calls", 30), model="m", n_prompt=10, n_cached=4,
                                    message_id="msg_s")


def test_stream_and_reply_agree_for_thinking_text_and_stop_sequence():
    deltas = [{"reasoning_content": "hm"}, {"content": "A"}, {"content": "B"}]
    msg = _accumulate(_parse(_stream(deltas, "stop", n_decoded=3, stop_sequence="END")))
    assert msg == chat_to_anthropic(_completion({"content": "AB", "reasoning_content": "hm"}, "stop", 3), model="m",
                                    n_prompt=10, n_cached=4, message_id="msg_s", stop_sequence="END")
    assert (msg["stop_reason"], msg["stop_sequence"]) == ("stop_sequence", "END")


def test_reasoning_after_text_opens_a_new_block_and_empty_stream_has_none():
    msg = _accumulate(_parse(_stream([{"content": "a"}, {"reasoning_content": "b"}, {"content": "c"}], "stop")))
    assert [b["type"] for b in msg["content"]] == ["text", "thinking", "text"]
    events = _parse(_stream([], "length", n_decoded=0))
    assert [e["type"] for e in events] == ["message_start", "message_delta", "message_stop"]


def test_stream_misuse_raises():
    s = AnthropicStream(model="m", n_prompt=1, n_cached=0)
    first = s.feed({"content": "x"})   # message_start comes with the first events when start() was not called
    assert _parse(first)[0]["type"] == "message_start" and s.start() == []
    with pytest.raises(ValueError, match="function name"):
        s.feed({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]})
    s.feed({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f"}}]})
    s.feed({"content": "y"})
    with pytest.raises(ValueError, match="after its block was closed"):
        s.feed({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]})
    with pytest.raises(ValueError, match="index"):
        s.feed({"tool_calls": [{"function": {"name": "g"}}]})
    with pytest.raises(ValueError, match="finish_reason"):
        s.finish("eog", n_decoded=1)
    s.finish("stop", n_decoded=1)
    with pytest.raises(RuntimeError, match="ended"):
        s.feed({"content": "z"})
    with pytest.raises(ValueError, match="n_cached"):
        AnthropicStream(model="m", n_prompt=1, n_cached=2)


def test_prompt_figures_known_late():
    s = AnthropicStream(model="m", n_prompt=0, n_cached=0)
    start = _parse(s.start(n_prompt=12, n_cached=8))[0]
    assert start["message"]["usage"] == {"cache_read_input_tokens": 8, "input_tokens": 4, "output_tokens": 0}
    events = _parse(s.feed({"content": "a"}) + s.finish("stop", n_decoded=2, n_prompt=12, n_cached=10))
    assert events[-2]["usage"] == {"cache_read_input_tokens": 10, "input_tokens": 2, "output_tokens": 2}
    assert _accumulate([start] + events)["usage"] == {"cache_read_input_tokens": 10, "input_tokens": 2,
                                                      "output_tokens": 2}
    with pytest.raises(ValueError, match="together"):
        AnthropicStream(model="m", n_prompt=1, n_cached=0).finish("stop", n_decoded=1, n_prompt=1)


def test_error_event_mid_stream_ends_the_stream():
    s = AnthropicStream(model="m", n_prompt=1, n_cached=0)
    out = s.feed({"content": "partial"}) + s.error(AnthropicError(500, "generation failed (error): boom"))
    events = _parse(out)
    assert events[-1] == {"type": "error", "error": {"type": "api_error", "message": "generation failed (error): boom"}}
    assert s.done
    with pytest.raises(RuntimeError):
        s.finish("stop", n_decoded=1)
    assert sse_event("ping", {"type": "ping"}) == 'event: ping\ndata: {"type":"ping"}\n\n'


# ---------------------------------------------------------------------------------------------------------
# the official anthropic client
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def sdk():
    """The official client and the HTTP library it is built on (httpx, or httpx2 in its newer releases):
    the fake transport and its responses must come from that one."""
    anthropic = pytest.importorskip("anthropic")
    base = next(c for c in anthropic.DefaultHttpxClient.__mro__[1:] if c.__name__ == "Client")
    return anthropic, importlib.import_module(base.__module__.partition(".")[0])


def _client(sdk, handler):
    anthropic, http = sdk
    return anthropic.Anthropic(api_key="sk-test", base_url="http://pyllm.test", max_retries=0,
                               http_client=anthropic.DefaultHttpxClient(transport=http.MockTransport(handler)))


def test_official_client_types_accept_the_reply_and_the_events():
    anthropic = pytest.importorskip("anthropic")
    from pydantic import TypeAdapter

    message = {"content": "Let me check.", "reasoning_content": "Weather.",
               "tool_calls": [{"id": "call_a",
                               "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'}}]}
    reply = chat_to_anthropic(_completion(message, "tool_calls"), model="m", n_prompt=20, n_cached=3)
    parsed = anthropic.types.Message.model_validate(reply)
    assert parsed.stop_reason == "tool_use" and parsed.usage.cache_read_input_tokens == 3
    assert [b.type for b in parsed.content] == ["thinking", "text", "tool_use"]
    assert parsed.content[2].input == {"location": "Paris"}
    events = _parse(_stream([{"reasoning_content": "a"}, {"content": "b"},
                             {"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": "{}"}}]}],
                            "tool_calls"))
    adapter = TypeAdapter(anthropic.types.RawMessageStreamEvent)
    typed = [adapter.validate_python(e) for e in events]
    assert [t.type for t in typed] == [e["type"] for e in events]
    for status in (400, 401, 403, 404, 429, 500, 503, 504):
        err = anthropic.types.ErrorResponse.model_validate(AnthropicError(status, "boom").body())
        assert err.error.type == AnthropicError(status, "boom").type and err.error.message == "boom"
    assert anthropic.types.MessageTokensCount.model_validate(count_tokens_response(3)).input_tokens == 3


def test_official_client_end_to_end_over_a_fake_transport(sdk):
    anthropic, http = sdk
    seen = []

    def handler(request):
        body = json.loads(request.content)
        seen.append((request.url.path, body))
        if request.url.path == "/v1/messages/count_tokens":
            count_tokens_to_chat(body)
            return http.Response(200, json=count_tokens_response(42))
        try:
            chat = anthropic_to_chat(body)
        except AnthropicError as err:
            return http.Response(err.status, json=err.body())
        full = {"content": "Sunny.", "reasoning_content": "Look it up.",
                "tool_calls": [{"id": "toolu_9",
                                "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'}}]}
        if not chat.get("stream"):
            return http.Response(200, json=chat_to_anthropic(_completion(full, "tool_calls", 9), model=chat["model"],
                                                              n_prompt=30, n_cached=10))
        s = AnthropicStream(model=chat["model"], n_prompt=30, n_cached=0)   # the cache hit is only known later
        text = "".join(s.feed({"reasoning_content": "Look it up."}) + s.feed({"content": "Sun"}) +
                       s.feed({"content": "ny."}) +
                       s.feed({"tool_calls": [{"index": 0, "id": "toolu_9", "function": {"name": "get_weather"}}]}) +
                       s.feed({"tool_calls": [{"index": 0, "function": {"arguments": '{"location":'}}]}) +
                       s.feed({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}) +
                       s.finish("tool_calls", n_decoded=9, n_prompt=30, n_cached=10))
        return http.Response(200, content=text.encode(), headers={"content-type": "text/event-stream"})

    client = _client(sdk, handler)
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "s"},
                                                 {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                  "input": {"location": "Paris"}}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18°C"}]}]
    kw = dict(model="local", max_tokens=2048, messages=history, tools=[WEATHER], system="Be brief.",
              tool_choice={"type": "auto", "disable_parallel_tool_use": True}, stop_sequences=["END"],
              thinking={"type": "enabled", "budget_tokens": 1024}, metadata={"user_id": "u1"},
              extra_body={"top_k": 5})   # newer clients no longer take temperature/top_p/top_k as arguments
    reply = client.messages.create(**kw)
    assert isinstance(reply, anthropic.types.Message)
    assert [b.type for b in reply.content] == ["thinking", "text", "tool_use"]
    assert reply.content[2].input == {"location": "Paris"} and reply.stop_reason == "tool_use"
    assert reply.usage.input_tokens == 20 and reply.usage.cache_read_input_tokens == 10
    # what the client sent translates as the unit tests above say
    chat = anthropic_to_chat(seen[-1][1])
    assert chat["parallel_tool_calls"] is False and chat["stop"] == ["END"] and chat["top_k"] == 5
    assert [m["role"] for m in chat["messages"]] == ["system", "user", "assistant", "tool"]

    with client.messages.stream(**kw) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == "Sunny."
    assert final.model_dump(exclude_none=True)["content"] == reply.model_dump(exclude_none=True)["content"]
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == 9
    assert (final.usage.input_tokens, final.usage.cache_read_input_tokens) == (20, 10)

    assert client.messages.count_tokens(model="local", messages=history, tools=[WEATHER]).input_tokens == 42

    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="local", max_tokens=10, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}])
    assert info.value.status_code == 400
    assert info.value.body["error"]["type"] == "invalid_request_error"
    assert "messages[0].content[0]" in info.value.body["error"]["message"]


def test_official_client_raises_on_a_mid_stream_error_event(sdk):
    anthropic, http = sdk
    def handler(request):
        s = AnthropicStream(model="m", n_prompt=3, n_cached=0)
        text = "".join(s.feed({"content": "par"}) + s.error(AnthropicError(500, "generation failed: boom")))
        return http.Response(200, content=text.encode(), headers={"content-type": "text/event-stream"})

    client = _client(sdk, handler)
    with pytest.raises(anthropic.APIStatusError, match="generation failed: boom"):
        with client.messages.stream(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}]) as stream:
            for _ in stream:
                pass
