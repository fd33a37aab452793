"""Anthropic's Messages API (``POST /v1/messages``, ``POST /v1/messages/count_tokens``) as llama-server
serves it: the request becomes an OpenAI chat-completions request (``server_chat_convert_anthropic_to_oai``
in ``tools/server/server-chat.cpp`` at the pin), goes through the chat path (template, tools, sampling,
limits, refusals are the chat endpoint's), and the chat result comes back in Anthropic's shape
(``to_json_anthropic`` / ``to_json_anthropic_stream`` in ``server-task.cpp``). This module is the two
translations and nothing else: no FastAPI, no engine.

* :func:`anthropic_to_chat` / :func:`count_tokens_to_chat`: an Anthropic request body (a dict) -> the chat
  request body (a dict, for ``ChatCompletionRequest``). Every field is translated, accepted because it
  changes nothing here (listed in ``IGNORED``), or refused with an :class:`AnthropicError` (400,
  ``invalid_request_error``) whose message starts with the field's path (``messages[2].content[0]``).
* :func:`chat_to_anthropic`: a chat completion (``message`` + ``finish_reason``) -> an Anthropic ``message``.
* :class:`AnthropicStream`: the chat stream's deltas -> Anthropic's server-sent events.
* :class:`AnthropicError` / :func:`from_openai_error`: errors in Anthropic's shape.

Where this differs from llama-server (which is permissive: it drops what it does not know):

* ``image`` / ``document`` / ``search_result`` blocks are refused (this server is text-only; llama-server
  turns images into ``image_url`` parts and fails later without a projector), and so are server tools,
  ``redacted_thinking`` (Claude's encrypted reasoning), ``mcp_servers``, ``container``, ``context_management``
  and any field not listed here.
* ``max_tokens`` is required on /v1/messages (Anthropic's rule; llama-server defaults it to 4096);
  ``max_tokens: 0`` (Anthropic: fill the prompt cache, generate nothing) becomes llama-server's
  ``n_predict: 0``.
* ``tool_choice`` ``{"type": "tool", "name": ...}`` names the function and ``{"type": "none"}`` becomes
  ``"none"`` (llama-server turns both "tool" and "any" into "required" and drops "none");
  ``disable_parallel_tool_use: true`` becomes ``parallel_tool_calls: false``.
* A user turn's ``tool_result`` blocks become ``tool`` messages placed *before* the turn's text (Anthropic
  requires results first; llama-server puts the text first, which puts a user turn between a tool call
  and its result).
* ``thinking`` also sets ``chat_template_kwargs.enable_thinking`` (true for ``enabled``/``adaptive``, false
  for ``disabled``); ``budget_tokens`` goes on as llama-server's ``thinking_budget_tokens``, which the chat
  layer honours or refuses (``pyllm.server.fields.REFUSED``).
* ``stop_reason`` is ``stop_sequence`` (with ``stop_sequence`` set) when a stop sequence ended the reply and
  the caller says which (llama-server reports ``end_turn`` there and only fills ``stop_sequence``).
* Streamed content blocks are numbered in the order they open and each is closed before the next opens
  (Anthropic's protocol); llama-server numbers them thinking 0, text 1, tools after, and closes them all at
  the end.

Kept from llama-server: the ``x-anthropic-billing-header`` system-prompt edit (Claude Code stamps a
per-request ``cch=`` hash into its system prompt; it is rewritten to ``fffff`` so the prompt cache reuses
the prefix: llama.cpp PR 21793), system text blocks joined without a separator, a system message for any
``system`` given, an empty ``signature`` on thinking blocks (no cryptographic signature for a local
model), usage ``input_tokens`` = prompt tokens not read from the cache and ``cache_read_input_tokens`` =
those that were.

Wiring (the app's job): ``POST /v1/messages`` reads the JSON, calls :func:`anthropic_to_chat`, validates
the dict as a ``ChatCompletionRequest`` and starts the chat; any ``AnthropicError`` is answered with
``err.status`` and ``err.body()`` (``err.headers`` too), and an OpenAI-shaped error of the chat path
(``APIError``, ``FieldError``) through :func:`from_openai_error` first. Not streamed: build the chat
completion and answer :func:`chat_to_anthropic`. Streamed: one :class:`AnthropicStream`, fed each chat delta,
then ``finish`` with the chat's finish_reason (or ``error`` with the failure), no ``data: [DONE]``.
``POST /v1/messages/count_tokens``: :func:`count_tokens_to_chat`, render, :func:`count_tokens_response`.
"""
from __future__ import annotations

import json
import math
import uuid
from typing import Any, Optional

from pyllm.errors import PyllmError

# ---------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------

#: Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors); a 4xx not listed is
#: an invalid_request_error, a 5xx not listed an api_error.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}


def error_type_of(status: int) -> str:
    """Anthropic's error ``type`` for an HTTP status (``ERROR_TYPES``, else by class: 4xx
    ``invalid_request_error``, 5xx ``api_error``)."""
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


class AnthropicError(PyllmError):
    """An error answered in Anthropic's shape: ``{"type": "error", "error": {"type", "message"}}``.

    ``status``: the HTTP status; ``message``: what went wrong (a request error starts with the field's path,
    which is also in ``param``); ``type``: Anthropic's error type (default: :func:`error_type_of`);
    ``headers``: extra response headers (``Retry-After`` on a 503)."""

    def __init__(self, status: int, message: str, type: Optional[str] = None, *, param: Optional[str] = None,
                 headers: Optional[dict] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = int(status), message, param, headers
        self.type = type or error_type_of(self.status)

    def body(self) -> dict:
        return {"type": "error", "error": {"type": self.type, "message": self.message}}

    def event(self) -> str:
        """The error as a server-sent event (``event: error``), for a failure after the stream began."""
        return sse_event("error", self.body())


#: Chat-request field -> the Anthropic field it came from, so an error the chat layer raises about a
#: translated field names the field the client sent.
CHAT_FIELD_PATHS = {
    "max_tokens": "max_tokens", "n_predict": "max_tokens", "stop": "stop_sequences",
    "thinking_budget_tokens": "thinking.budget_tokens", "parallel_tool_calls": "tool_choice.disable_parallel_tool_use",
    "reasoning_effort": "output_config.effort", "response_format": "output_config.format",
    "tools": "tools", "tool_choice": "tool_choice", "messages": "messages",
}


def from_openai_error(status: int, message: str, param: Optional[str] = None, *,
                      headers: Optional[dict] = None) -> AnthropicError:
    """The :class:`AnthropicError` for an error the chat path raised in OpenAI's shape (``APIError``'s
    ``status``, ``message``, ``param``; a ``FieldError`` is a 400). A ``param`` that is a translated chat
    field is named by its Anthropic path (``thinking_budget_tokens`` -> ``thinking.budget_tokens``)."""
    path = CHAT_FIELD_PATHS.get(param, param) if param else None
    if path and path != param:
        message = f"{path}: {message}"
    return AnthropicError(status, message, param=path, headers=headers)


def _refuse(path: str, why: str) -> AnthropicError:
    return AnthropicError(400, f"{path}: {why}" if path else why, param=path or None)


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


# ---------------------------------------------------------------------------------------------------------
# request: Anthropic -> chat
# ---------------------------------------------------------------------------------------------------------

#: Top-level fields accepted and ignored, because they change nothing this server produces: ``metadata``
#: (``user_id``, an opaque id for Anthropic's abuse detection), ``service_tier`` (Anthropic's capacity
#: tiers), ``cache_control`` (prompt-caching breakpoints: this server reuses any common prefix on its own),
#: ``inference_geo`` (where Anthropic runs inference), ``speed`` (Anthropic's fast-inference mode),
#: ``diagnostics`` (asks for ``diagnostics.cache_miss_reason`` in the reply, which this server does not
#: report). Blocks and tools may carry ``cache_control`` too.
IGNORED = ("metadata", "service_tier", "cache_control", "inference_geo", "speed", "diagnostics")

#: llama-server's sampling extensions, passed to the chat request as they are (the chat layer validates and
#: honours them). llama-server's own converter passes only ``chat_template_kwargs`` and drops the rest.
EXTENSIONS = ("chat_template_kwargs", "seed", "min_p", "repeat_penalty", "repeat_last_n", "typical_p", "logit_bias")

#: Refused top-level fields, with the reason.
REFUSED = {
    "mcp_servers": "MCP servers are not supported: this server runs no tools itself; declare client tools in 'tools'",
    "container": "containers (the code execution tool) are not supported",
    "context_management": "context management (clearing old tool results or thinking) is not supported",
}

_TRANSLATED = ("model", "max_tokens", "messages", "system", "tools", "tool_choice", "stop_sequences",
               "temperature", "top_p", "top_k", "stream", "thinking", "output_config")

_TEXT_ONLY = "this server is text-only (no images, documents or files)"
_UNSUPPORTED_BLOCKS = {
    "image": _TEXT_ONLY, "document": _TEXT_ONLY, "search_result": "search result blocks are not supported",
    "container_upload": "container uploads are not supported",
    "redacted_thinking": "redacted (encrypted) thinking comes from Anthropic's models and cannot be read here",
    "server_tool_use": "server tools are not supported", "web_search_tool_result": "server tools are not supported",
    "web_fetch_tool_result": "server tools are not supported",
    "code_execution_tool_result": "server tools are not supported",
    "bash_code_execution_tool_result": "server tools are not supported",
    "text_editor_code_execution_tool_result": "server tools are not supported",
    "tool_search_tool_result": "server tools are not supported",
    "mcp_tool_use": "MCP tools are not supported", "mcp_tool_result": "MCP tools are not supported",
}

_BILLING_HEADER = "x-anthropic-billing-header:"


def normalize_billing_header(text: str) -> str:
    """llama-server's ``normalize_anthropic_billing_header``: a system text that starts with
    ``x-anthropic-billing-header:`` has its 5-character ``cch=`` stamp (followed by ``;``) replaced by
    ``fffff``; any other text is returned unchanged. The stamp differs on every Claude Code request and
    would stop the prompt cache at the system prompt."""
    if not text.startswith(_BILLING_HEADER):
        return text
    i = text.find("cch=", len(_BILLING_HEADER))
    if i < 0:
        return text
    start = i + 4
    if start + 5 < len(text) and text[start + 5] == ";":
        return text[:start] + "fffff" + text[start + 5:]
    return text


def _obj(value: Any, path: str) -> dict:
    if not isinstance(value, dict):
        raise _refuse(path, f"expected an object, got {_type_name(value)}")
    return value


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _refuse(path, f"expected a string, got {_type_name(value)}")
    return value


def _int(value: Any, path: str, *, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refuse(path, f"expected an integer, got {_shown(value)}")
    if minimum is not None and value < minimum:
        raise _refuse(path, f"{value} is below the minimum, {minimum}")
    return value


def _number(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _refuse(path, f"expected a finite number, got {_shown(value)}")
    return value


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _refuse(path, f"expected true or false, got {_shown(value)}")
    return value


def _check_keys(block: dict, path: str, allowed: tuple, what: str) -> None:
    for key in block:
        if key not in allowed:
            raise _refuse(f"{path}.{key}", f"is not a field of {what} this server takes (accepted: "
                                           f"{', '.join(allowed)})")


def _no_citations(block: dict, path: str) -> None:
    if block.get("citations"):
        raise _refuse(f"{path}.citations", "citations are not supported")


def _text_block(block: dict, path: str) -> str:
    _check_keys(block, path, ("type", "text", "cache_control", "citations"), "a text block")
    _no_citations(block, path)
    return _str(block.get("text"), f"{path}.text")


def _block_type(block: Any, path: str) -> str:
    block = _obj(block, path)
    kind = block.get("type")
    if not isinstance(kind, str):
        raise _refuse(f"{path}.type", f"expected a content block type, got {_shown(kind)}")
    if kind in _UNSUPPORTED_BLOCKS:
        raise _refuse(path, f"{kind!r} blocks are not supported: {_UNSUPPORTED_BLOCKS[kind]}")
    return kind


def _system(value: Any) -> str:
    if isinstance(value, str):
        return normalize_billing_header(value)
    if not isinstance(value, list):
        raise _refuse("system", f"expected a string or an array of text blocks, got {_type_name(value)}")
    parts = []
    for j, block in enumerate(value):
        path = f"system[{j}]"
        kind = _block_type(block, path)
        if kind != "text":
            raise _refuse(f"{path}.type", f"{kind!r}: the system prompt takes text blocks only")
        parts.append(normalize_billing_header(_text_block(block, path)))
    return "".join(parts)


def _tool_result(block: dict, path: str) -> dict:
    _check_keys(block, path, ("type", "tool_use_id", "content", "is_error", "cache_control"), "a tool_result block")
    tool_use_id = _str(block.get("tool_use_id"), f"{path}.tool_use_id")
    if "is_error" in block:
        # OpenAI's tool message has no error flag: the result's text, which says what failed, is what the
        # template shows (llama-server does the same).
        _bool(block["is_error"], f"{path}.is_error")
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for k, part in enumerate(content):
            ppath = f"{path}.content[{k}]"
            kind = _block_type(part, ppath)
            if kind != "text":
                raise _refuse(f"{ppath}.type", f"{kind!r}: a tool result takes text blocks only")
            parts.append(_text_block(part, ppath))
        text = "".join(parts)   # llama-server collapses text-only results to one string, no separator
    else:
        raise _refuse(f"{path}.content", f"expected a string or an array of text blocks, got {_type_name(content)}")
    return {"role": "tool", "tool_call_id": tool_use_id, "content": text}


def _tool_use(block: dict, path: str) -> dict:
    _check_keys(block, path, ("type", "id", "name", "input", "cache_control", "caller"), "a tool_use block")
    caller = block.get("caller")
    if caller is not None and not (isinstance(caller, dict) and caller.get("type") == "direct"):
        raise _refuse(f"{path}.caller", f"{_shown(caller)}: only direct calls by the model are supported")
    tool_input = _obj(block.get("input"), f"{path}.input")
    return {"id": _str(block.get("id"), f"{path}.id"), "type": "function",
            "function": {"name": _str(block.get("name"), f"{path}.name"),
                         # compact, as llama-server's json::dump()
                         "arguments": json.dumps(tool_input, ensure_ascii=False, separators=(",", ":"))}}


def _messages(value: Any) -> list[dict]:
    if not isinstance(value, list):
        raise _refuse("messages", f"expected an array of messages, got {_type_name(value)}")
    out: list[dict] = []
    for i, msg in enumerate(value):
        path = f"messages[{i}]"
        msg = _obj(msg, path)
        _check_keys(msg, path, ("role", "content"), "a message")
        role = msg.get("role")
        if role not in ("user", "assistant"):
            hint = "; put a system prompt in the top-level 'system' field" if role == "system" else ""
            raise _refuse(f"{path}.role", f"{_shown(role)} is not a role of the Messages API (user, assistant){hint}")
        if "content" not in msg:
            raise _refuse(f"{path}.content", "is required: a string or an array of content blocks")
        content = msg["content"]
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise _refuse(f"{path}.content", f"expected a string or an array of content blocks, got "
                                             f"{_type_name(content)}")
        texts: list[dict] = []
        tool_calls: list[dict] = []
        tool_results: list[dict] = []
        reasoning: list[str] = []
        for j, block in enumerate(content):
            bpath = f"{path}.content[{j}]"
            kind = _block_type(block, bpath)
            if kind == "text":
                texts.append({"type": "text", "text": _text_block(block, bpath)})
            elif kind == "thinking" and role == "assistant":
                _check_keys(block, bpath, ("type", "thinking", "signature", "cache_control"), "a thinking block")
                if "signature" in block:
                    _str(block["signature"], f"{bpath}.signature")   # Claude's or ours (empty): not checked
                reasoning.append(_str(block.get("thinking"), f"{bpath}.thinking"))
            elif kind == "tool_use" and role == "assistant":
                tool_calls.append(_tool_use(block, bpath))
            elif kind == "tool_result" and role == "user":
                tool_results.append(_tool_result(block, bpath))
            elif kind in ("thinking", "tool_use", "tool_result"):
                raise _refuse(f"{bpath}.type", f"a {kind} block belongs in "
                                               f"{'a user' if kind == 'tool_result' else 'an assistant'} message, "
                                               f"not in a {role} message")
            else:
                raise _refuse(f"{bpath}.type", f"{kind!r} is not a content block type this server takes (text, "
                                               "tool_use, tool_result, thinking)")
        # The results answer the previous assistant turn, so they come first (as Anthropic requires them to).
        out.extend(tool_results)
        thought = "".join(reasoning)
        if texts or tool_calls or thought:   # as llama-server: a turn with nothing in it is no message
            new: dict = {"role": role, "content": texts if texts else ""}
            if tool_calls:
                new["tool_calls"] = tool_calls
            if thought:
                new["reasoning_content"] = thought
            out.append(new)
    return out


def _tools(value: Any) -> list[dict]:
    if not isinstance(value, list):
        raise _refuse("tools", f"expected an array of tools, got {_type_name(value)}")
    out = []
    for i, tool in enumerate(value):
        path = f"tools[{i}]"
        tool = _obj(tool, path)
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise _refuse(f"{path}.type", f"{_shown(kind)}: server tools are not supported (this server runs no "
                                          "tools; declare client tools with name, description and input_schema)")
        _check_keys(tool, path, ("type", "name", "description", "input_schema", "cache_control", "strict"), "a tool")
        schema = _obj(tool.get("input_schema"), f"{path}.input_schema")
        function = {"name": _str(tool.get("name"), f"{path}.name"),
                    "description": _str(tool.get("description", ""), f"{path}.description"),
                    "parameters": schema}
        if tool.get("strict") is not None:
            function["strict"] = _bool(tool["strict"], f"{path}.strict")   # the chat layer honours or refuses it
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(value: Any, chat: dict) -> None:
    tc = _obj(value, "tool_choice")
    kind = tc.get("type")
    allowed = {"auto": ("type", "disable_parallel_tool_use"), "any": ("type", "disable_parallel_tool_use"),
               "tool": ("type", "name", "disable_parallel_tool_use"), "none": ("type",)}
    if kind not in allowed:
        raise _refuse("tool_choice.type", f"{_shown(kind)}; expected auto, any, tool or none")
    _check_keys(tc, "tool_choice", allowed[kind], f"tool_choice {kind!r}")
    if kind == "tool":
        chat["tool_choice"] = {"type": "function", "function": {"name": _str(tc.get("name"), "tool_choice.name")}}
    else:
        chat["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
    if "disable_parallel_tool_use" in tc and _bool(tc["disable_parallel_tool_use"],
                                                   "tool_choice.disable_parallel_tool_use"):
        chat["parallel_tool_calls"] = False   # false/absent: the template's default (parallel where it can)


def _thinking(value: Any, chat: dict) -> None:
    cfg = _obj(value, "thinking")
    kind = cfg.get("type")
    if kind not in ("enabled", "disabled", "adaptive"):
        raise _refuse("thinking.type", f"{_shown(kind)}; expected enabled, disabled or adaptive")
    _check_keys(cfg, "thinking", ("type", "budget_tokens", "display") if kind == "enabled" else
                ("type", "display") if kind == "adaptive" else ("type",), f"thinking {kind!r}")
    display = cfg.get("display")
    if display not in (None, "summarized"):
        raise _refuse("thinking.display", f"{_shown(display)} is not supported: the thinking text is returned as "
                                          "generated (display 'summarized')")
    kwargs = chat.setdefault("chat_template_kwargs", {})
    enable = kind != "disabled"
    if "enable_thinking" in kwargs and kwargs["enable_thinking"] is not enable:
        raise _refuse("thinking.type", f"{kind!r} contradicts chat_template_kwargs.enable_thinking="
                                       f"{_shown(kwargs['enable_thinking'])}")
    kwargs["enable_thinking"] = enable
    if kind == "enabled":
        if "budget_tokens" not in cfg:
            raise _refuse("thinking.budget_tokens", "is required with thinking type 'enabled'")
        chat["thinking_budget_tokens"] = _int(cfg["budget_tokens"], "thinking.budget_tokens", minimum=1)


def _output_config(value: Any, chat: dict) -> None:
    cfg = _obj(value, "output_config")
    _check_keys(cfg, "output_config", ("effort", "format"), "output_config")
    if cfg.get("effort") is not None:
        chat["reasoning_effort"] = _str(cfg["effort"], "output_config.effort")   # to the template, as is
    fmt = cfg.get("format")
    if fmt is not None:
        fmt = _obj(fmt, "output_config.format")
        if fmt.get("type") != "json_schema":
            raise _refuse("output_config.format.type", f"{_shown(fmt.get('type'))}; expected json_schema")
        _check_keys(fmt, "output_config.format", ("type", "schema"), "output_config.format")
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "output", "schema": _obj(fmt.get("schema"), "output_config.format.schema"), "strict": True}}


def _to_chat(body: Any, *, count_tokens: bool) -> dict:
    if not isinstance(body, dict):
        raise _refuse("", f"the request body must be a JSON object, got {_type_name(body)}")
    for key in body:
        if key in REFUSED:
            if body[key] not in (None, [], {}):
                raise _refuse(key, f"is not supported: {REFUSED[key]}")
        elif key not in _TRANSLATED and key not in IGNORED and key not in EXTENSIONS:
            raise _refuse(key, "is not a field of the Messages API this server takes")
    if "metadata" in body and body["metadata"] is not None:
        _obj(body["metadata"], "metadata")
    chat: dict = {}
    if body.get("model") is not None:
        chat["model"] = _str(body["model"], "model")
    if "max_tokens" in body or not count_tokens:
        if "max_tokens" not in body:
            raise _refuse("max_tokens", "is required: the most tokens to generate (0: only fill the prompt cache)")
        n = _int(body["max_tokens"], "max_tokens", minimum=0)
        if n == 0:
            chat["n_predict"] = 0   # llama-server's "decode the prompt only"; the chat schema's max_tokens is >= 1
        else:
            chat["max_tokens"] = n
    if "messages" not in body:
        raise _refuse("messages", "is required: an array of user and assistant messages")
    messages = _messages(body["messages"])
    if body.get("system") is not None:
        messages.insert(0, {"role": "system", "content": _system(body["system"])})
    chat["messages"] = messages
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], chat)
    if body.get("stop_sequences") is not None:
        stops = body["stop_sequences"]
        if not isinstance(stops, list):
            raise _refuse("stop_sequences", f"expected an array of strings, got {_type_name(stops)}")
        chat["stop"] = [_str(s, f"stop_sequences[{k}]") for k, s in enumerate(stops)]
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            chat[name] = _number(body[name], name)
    if body.get("top_k") is not None:
        chat["top_k"] = _int(body["top_k"], "top_k")
    if body.get("stream") is not None:
        chat["stream"] = _bool(body["stream"], "stream")
    for name in EXTENSIONS:
        if body.get(name) is not None:
            chat[name] = dict(_obj(body[name], name)) if name == "chat_template_kwargs" else body[name]
    if body.get("thinking") is not None:
        _thinking(body["thinking"], chat)
    if body.get("output_config") is not None:
        _output_config(body["output_config"], chat)
    return chat


def anthropic_to_chat(body: Any) -> dict:
    """The OpenAI chat-completions request (a dict) for an Anthropic Messages request ``body`` (the parsed
    JSON of ``POST /v1/messages``). Raises :class:`AnthropicError` (400, ``invalid_request_error``, the
    message starting with the field's path) for a field that is malformed, unknown, or changes output in
    a way this server cannot honour. ``model`` may be absent (the chat path then serves its model, as
    llama-server does). See the module docstring for the translation."""
    return _to_chat(body, count_tokens=False)


def count_tokens_to_chat(body: Any) -> dict:
    """:func:`anthropic_to_chat` for ``POST /v1/messages/count_tokens``: the same fields, ``max_tokens``
    optional. Render the returned request as the chat endpoint would and answer
    :func:`count_tokens_response` with its token count."""
    return _to_chat(body, count_tokens=True)


def count_tokens_response(n_tokens: int) -> dict:
    """The body of a count_tokens answer: ``{"input_tokens": n}`` (the rendered prompt's tokens)."""
    return {"input_tokens": _checked_count(n_tokens, "n_tokens")}


# ---------------------------------------------------------------------------------------------------------
# response: chat -> Anthropic
# ---------------------------------------------------------------------------------------------------------

def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def _checked_count(n: Any, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{name}={n!r}: expected a token count (an integer >= 0)")
    return n


def _usage(n_prompt: int, n_cached: int) -> dict:
    n_prompt, n_cached = _checked_count(n_prompt, "n_prompt"), _checked_count(n_cached, "n_cached")
    if n_cached > n_prompt:
        raise ValueError(f"n_cached={n_cached} exceeds n_prompt={n_prompt}")
    # Anthropic's input_tokens excludes cache reads: their sum is the prompt (as llama-server reports it).
    return {"cache_read_input_tokens": n_cached, "input_tokens": n_prompt - n_cached}


_FINISH_REASONS = ("stop", "length", "tool_calls")


def stop_reason_of(finish_reason: str, *, has_tool_use: bool, stop_sequence: Optional[str] = None) -> str:
    """Anthropic's ``stop_reason`` for an OpenAI ``finish_reason``: ``length`` -> ``max_tokens``;
    ``tool_calls``, or ``stop`` after a tool call -> ``tool_use``; ``stop`` with the matched
    ``stop_sequence`` -> ``stop_sequence``; other ``stop`` -> ``end_turn``."""
    if finish_reason not in _FINISH_REASONS:
        raise ValueError(f"finish_reason={finish_reason!r}: expected one of {', '.join(_FINISH_REASONS)}")
    if finish_reason == "length":
        return "max_tokens"
    if finish_reason == "tool_calls" or has_tool_use:
        return "tool_use"
    return "stop_sequence" if stop_sequence is not None else "end_turn"


def _tool_input(arguments: Any, where: str, truncated: bool) -> dict:
    if isinstance(arguments, dict):
        return arguments
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    try:
        value = json.loads(arguments)
    except (TypeError, ValueError):
        value = None
    if isinstance(value, dict):
        return value
    if truncated:
        # max_tokens cut the call short; Anthropic returns the incomplete tool_use block with stop_reason
        # max_tokens, and its input must be an object: the empty one (as llama-server).
        return {}
    raise AnthropicError(500, f"{where}: the tool call's arguments are not a JSON object: {_shown(arguments)}")


def chat_to_anthropic(result: dict, *, model: str, n_prompt: int, n_cached: int, n_decoded: Optional[int] = None,
                      stop_sequence: Optional[str] = None, message_id: Optional[str] = None) -> dict:
    """The Anthropic ``message`` for a chat completion.

    ``result``: the chat completion (``{"choices": [{"message", "finish_reason"}], "usage": {...}}``) or its
    one choice (``{"message", "finish_reason"}``); ``message`` holds ``content``, ``reasoning_content`` and
    ``tool_calls`` (OpenAI's ``[{"id", "function": {"name", "arguments"}}]``). ``n_prompt``: the prompt's
    tokens; ``n_cached``: those whose K/V came from the cache; ``n_decoded``: the generated tokens (default:
    ``result["usage"]["completion_tokens"]``). ``stop_sequence``: the stop sequence that ended the reply, if
    one did (the chat result does not say which). ``message_id``: default a new ``msg_...``.

    Content blocks come in llama-server's order: thinking (with an empty ``signature``), text, tool_use (its
    ``input`` the parsed arguments). Raises ValueError for a malformed ``result`` or counts, and
    :class:`AnthropicError` (500) for a finished tool call whose arguments are not a JSON object."""
    choice = result
    if isinstance(result, dict) and "choices" in result:
        choices = result["choices"]
        if not isinstance(choices, list) or len(choices) != 1:
            raise ValueError(f"result has {_shown(choices)} as choices; expected exactly one choice")
        choice = choices[0]
    if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
        raise ValueError("result: expected a chat completion or a choice with a 'message' object")
    if n_decoded is None:
        usage = result.get("usage") if isinstance(result, dict) else None
        if not isinstance(usage, dict) or "completion_tokens" not in usage:
            raise ValueError("n_decoded is not given and result has no usage.completion_tokens")
        n_decoded = usage["completion_tokens"]
    n_decoded = _checked_count(n_decoded, "n_decoded")
    msg, finish = choice["message"], choice.get("finish_reason")
    content: list[dict] = []
    if msg.get("reasoning_content"):
        content.append({"type": "thinking", "thinking": msg["reasoning_content"], "signature": ""})
    if msg.get("content"):
        if not isinstance(msg["content"], str):
            raise ValueError(f"message.content: expected text, got {_type_name(msg['content'])}")
        content.append({"type": "text", "text": msg["content"]})
    for k, call in enumerate(msg.get("tool_calls") or []):
        fn = call.get("function") or {}
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"message.tool_calls[{k}] has no function name")
        content.append({"type": "tool_use", "id": call.get("id") or f"toolu_{uuid.uuid4().hex}", "name": fn["name"],
                        "input": _tool_input(fn.get("arguments"), f"tool call {k} ({fn['name']})",
                                             truncated=finish == "length")})
    stop_reason = stop_reason_of(finish, has_tool_use=any(b["type"] == "tool_use" for b in content),
                                 stop_sequence=stop_sequence)
    return {"id": message_id or new_message_id(), "type": "message", "role": "assistant", "content": content,
            "model": model, "stop_reason": stop_reason,
            "stop_sequence": stop_sequence if stop_reason == "stop_sequence" else None,
            "usage": {**_usage(n_prompt, n_cached), "output_tokens": n_decoded}}


# ---------------------------------------------------------------------------------------------------------
# streaming
# ---------------------------------------------------------------------------------------------------------

def sse_event(name: str, data: dict) -> str:
    """One server-sent event as Anthropic sends them: ``event: NAME`` and ``data: JSON``."""
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class AnthropicStream:
    """Anthropic's streamed events for one chat stream.

    Feed it the chat stream's deltas (:meth:`feed`: OpenAI ``choices[0].delta`` dicts: ``reasoning_content``
    text, ``content`` text, ``tool_calls`` pieces ``{"index", "id", "function": {"name"}}`` first, then
    ``{"index", "function": {"arguments"}}``), then :meth:`finish` (or :meth:`error`). Each call returns the
    events (SSE text) to send now: ``message_start`` first (from :meth:`start`, or the first call), then per
    content block ``content_block_start``, its deltas (``thinking_delta``, ``text_delta``,
    ``input_json_delta``; a thinking block ends with an empty ``signature_delta``) and ``content_block_stop``,
    then ``message_delta`` (``stop_reason``, ``usage.output_tokens``) and ``message_stop``.

    Blocks are numbered in the order they open (0, 1, ...); a block is closed when the next one opens, so
    reasoning after text opens a new thinking block. A call after the stream ended raises RuntimeError; a
    delta that cannot be sent in order (arguments for a tool call whose block is closed) raises ValueError.
    """

    def __init__(self, *, model: str, n_prompt: int, n_cached: int, message_id: Optional[str] = None) -> None:
        self.model, self.message_id = model, message_id or new_message_id()
        self._usage = _usage(n_prompt, n_cached)
        self._started = self._done = False
        self._index = -1            # the open block's index (-1: none yet)
        self._open: Optional[tuple] = None    # ("thinking",) | ("text",) | ("tool_use", chat index)
        self._tools_seen: set[int] = set()
        self.n_blocks = 0

    def _n_prompt(self) -> int:
        return self._usage["input_tokens"] + self._usage["cache_read_input_tokens"]

    @property
    def done(self) -> bool:
        return self._done

    def _check(self) -> None:
        if self._done:
            raise RuntimeError("the Anthropic stream has ended (message_stop or error was sent)")

    def start(self, *, n_prompt: Optional[int] = None, n_cached: Optional[int] = None) -> list[str]:
        """``message_start`` (once; later calls return nothing). ``n_prompt``/``n_cached`` replace the
        constructor's figures when given (llama-server sends this event with the first token, once the
        prompt's cache hit is known)."""
        self._check()
        if self._started:
            return []
        if n_prompt is not None or n_cached is not None:
            self._usage = _usage(n_prompt if n_prompt is not None else self._n_prompt(),
                                 n_cached if n_cached is not None else self._usage["cache_read_input_tokens"])
        self._started = True
        message = {"id": self.message_id, "type": "message", "role": "assistant", "content": [], "model": self.model,
                   "stop_reason": None, "stop_sequence": None, "usage": {**self._usage, "output_tokens": 0}}
        return [sse_event("message_start", {"type": "message_start", "message": message})]

    def ping(self) -> str:
        """A ``ping`` event (Anthropic sends them to keep a connection alive)."""
        self._check()
        return sse_event("ping", {"type": "ping"})

    def _close(self) -> list[str]:
        if self._open is None:
            return []
        out = []
        if self._open[0] == "thinking":
            # Anthropic's protocol sends a signature before a thinking block closes; a local model has none.
            out.append(sse_event("content_block_delta", {"type": "content_block_delta", "index": self._index,
                                                         "delta": {"type": "signature_delta", "signature": ""}}))
        out.append(sse_event("content_block_stop", {"type": "content_block_stop", "index": self._index}))
        self._open = None
        return out

    def _open_block(self, key: tuple, block: dict) -> list[str]:
        out = self._close()
        self._index += 1
        self.n_blocks += 1
        self._open = key
        out.append(sse_event("content_block_start", {"type": "content_block_start", "index": self._index,
                                                     "content_block": block}))
        return out

    def _delta(self, delta: dict) -> str:
        return sse_event("content_block_delta", {"type": "content_block_delta", "index": self._index, "delta": delta})

    def feed(self, delta: dict) -> list[str]:
        """The events for one chat delta (see the class docstring)."""
        out = self.start()
        if not isinstance(delta, dict):
            raise ValueError(f"delta: expected an object, got {_type_name(delta)}")
        reasoning = delta.get("reasoning_content")
        if reasoning:
            if self._open != ("thinking",):
                out += self._open_block(("thinking",), {"type": "thinking", "thinking": "", "signature": ""})
            out.append(self._delta({"type": "thinking_delta", "thinking": reasoning}))
        text = delta.get("content")
        if text:
            if self._open != ("text",):
                out += self._open_block(("text",), {"type": "text", "text": ""})
            out.append(self._delta({"type": "text_delta", "text": text}))
        for piece in delta.get("tool_calls") or []:
            out += self._tool_piece(piece)
        return out

    def _tool_piece(self, piece: dict) -> list[str]:
        index = piece.get("index")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"tool_calls piece {_shown(piece)}: expected an 'index' >= 0")
        fn = piece.get("function") or {}
        out = []
        if index not in self._tools_seen:
            name = fn.get("name")
            if not isinstance(name, str) or not name:
                raise ValueError(f"tool call {index}: its first piece must carry the function name, got "
                                 f"{_shown(piece)}")
            self._tools_seen.add(index)
            out += self._open_block(("tool_use", index), {"type": "tool_use",
                                                          "id": piece.get("id") or f"toolu_{uuid.uuid4().hex}",
                                                          "name": name, "input": {}})
        elif self._open != ("tool_use", index):
            raise ValueError(f"tool call {index}: a piece arrived after its block was closed (another block opened)")
        elif fn.get("name"):
            raise ValueError(f"tool call {index}: its name came twice")
        arguments = fn.get("arguments")
        if arguments:
            if not isinstance(arguments, str):
                raise ValueError(f"tool call {index}: arguments must be text (pieces of JSON)")
            out.append(self._delta({"type": "input_json_delta", "partial_json": arguments}))
        return out

    def finish(self, finish_reason: str, *, n_decoded: int, stop_sequence: Optional[str] = None,
               n_prompt: Optional[int] = None, n_cached: Optional[int] = None) -> list[str]:
        """The open block's end, ``message_delta`` and ``message_stop``. ``finish_reason``: OpenAI's
        (``stop``, ``length``, ``tool_calls``); ``n_decoded``: the generated tokens; ``stop_sequence``:
        the stop sequence that ended the reply, if one did (see :func:`stop_reason_of`). ``n_prompt`` and
        ``n_cached`` (both, or neither): the final prompt figures, sent in ``message_delta``'s usage as
        ``input_tokens`` and ``cache_read_input_tokens`` (Anthropic's cumulative usage) when
        ``message_start`` went out before they were known; without them the usage is ``output_tokens``
        alone, as llama-server sends it."""
        if (n_prompt is None) != (n_cached is None):
            raise ValueError("finish: give n_prompt and n_cached together, or neither")
        out = self.start()
        n_decoded = _checked_count(n_decoded, "n_decoded")
        usage = {**_usage(n_prompt, n_cached), "output_tokens": n_decoded} if n_prompt is not None else \
            {"output_tokens": n_decoded}
        stop_reason = stop_reason_of(finish_reason, has_tool_use=bool(self._tools_seen), stop_sequence=stop_sequence)
        out += self._close()
        out.append(sse_event("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason,
                      "stop_sequence": stop_sequence if stop_reason == "stop_sequence" else None},
            "usage": usage}))
        out.append(sse_event("message_stop", {"type": "message_stop"}))
        self._done = True
        return out

    def error(self, err: AnthropicError) -> list[str]:
        """An ``error`` event for a failure after the stream began (HTTP status is already 200); the stream
        ends there, as llama-server's does (no ``message_stop``)."""
        self._check()
        self._done = True
        return [err.event()]
