"""What a request asks the reply to be, read and checked before anything runs: tool calls (``tools``,
``tool_choice``, ``parallel_tool_calls``) and structured output (``response_format``, and llama-server's
``json_schema`` and ``grammar``). Every API surface reads them here (chat completions, completions,
llama-server's /completion, Anthropic's messages after translation), so a field is checked once.

The checks are llama.cpp's where llama.cpp has one: a JSON schema must convert with its
``json_schema_to_grammar`` and a grammar must parse with its GBNF parser (:mod:`pyllm.chat_common`), so
a request that llama.cpp would refuse or abort on is a 400 naming the field, with llama.cpp's reason.
The forms follow llama-server (``oaicompat_chat_params_parse`` in ``tools/server/server-common.cpp``):
``response_format`` ``json_object`` (an optional ``schema``) or ``json_schema`` (``json_schema.schema``;
an absent or empty schema means any object); ``json_schema`` and ``grammar`` are not both given, and
neither goes with tools unless ``tool_choice`` is ``none``. OpenAI's named ``tool_choice``
(``{"type": "function", "function": {"name": ...}}``), which llama.cpp's parser has no value for, is
served as ``required`` over that one tool.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional

from pyllm.chat_common import check_grammar, json_schema_to_grammar, unsupported_patterns
from pyllm.errors import GrammarError
from pyllm.server.fields import FieldError

#: The largest JSON schema (response_format, json_schema, one tool's parameters), as compact JSON bytes.
MAX_SCHEMA_BYTES = 64 * 1024
#: The largest GBNF grammar text, in bytes.
MAX_GRAMMAR_BYTES = 64 * 1024
#: The most tools one request may declare.
MAX_TOOLS = 128
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")

__all__ = ["Constraint", "constraint_of", "MAX_SCHEMA_BYTES", "MAX_GRAMMAR_BYTES", "MAX_TOOLS"]


@dataclass
class Constraint:
    """A request's tools and output constraint, checked. ``tools``: OpenAI function tools (None: none);
    ``tool_choice``: ``auto``, ``none`` or ``required`` (a named choice became ``required`` over that tool
    alone, ``forced``: its name); ``parallel_tool_calls``: None = what the template supports;
    ``json_schema``: the schema the reply follows (None: none); ``grammar``: GBNF text ("" none);
    ``schema_param``: the field that gave the schema (for errors)."""

    tools: Optional[list[dict]] = None
    tool_choice: str = "auto"
    parallel_tool_calls: Optional[bool] = None
    json_schema: Optional[dict] = None
    grammar: str = ""
    forced: Optional[str] = None
    schema_param: str = "json_schema"

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def active(self) -> bool:
        """Whether the reply is constrained or parsed for tool calls at all."""
        return self.uses_tools or self.json_schema is not None or bool(self.grammar)

    def plain_grammar(self) -> str:
        """The grammar for a prompt without a chat template (completions): the JSON schema's, or the
        grammar as given."""
        if self.json_schema is not None:
            return json_schema_to_grammar(self.json_schema)
        return self.grammar


def _size(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def check_schema(schema: Any, param: str) -> dict:
    """A JSON schema that llama.cpp converts to a grammar (an empty one means any object); FieldError naming
    ``param`` otherwise."""
    if not isinstance(schema, dict):
        raise FieldError(f"{param} is a {type(schema).__name__}; expected a JSON schema object", param)
    if _size(schema) > MAX_SCHEMA_BYTES:
        raise FieldError(f"{param} is {_size(schema)} bytes of JSON; at most {MAX_SCHEMA_BYTES} are accepted", param)
    schema = dict(schema) or {"type": "object"}
    try:
        json_schema_to_grammar(schema)
        unsupported = unsupported_patterns(schema)
    except GrammarError as exc:
        raise FieldError(f"{param}: {exc}", param) from None
    if unsupported:
        # llama-server warns and lets any string through; a pattern the reply would not honour is refused.
        raise FieldError(f"{param}: pattern {unsupported[0]!r} is not supported by llama.cpp's JSON-schema "
                         "converter (the grammar would accept any string there); use a pattern anchored with ^ and "
                         "$ built from literals, [...] classes, '.', groups, '|' and quantifiers (no \\d, \\w, "
                         "\\s or lookarounds), or drop the pattern", param)
    return schema


def _tools(value: Any) -> Optional[list[dict]]:
    if value is None:
        return None
    if not isinstance(value, list):
        raise FieldError(f"tools is a {type(value).__name__}; expected a list of function tools", "tools")
    if len(value) > MAX_TOOLS:
        raise FieldError(f"tools has {len(value)} entries; at most {MAX_TOOLS} are accepted", "tools")
    out, names = [], set()
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise FieldError(f"{where} is a {type(tool).__name__}; expected {{'type': 'function', 'function': "
                             "{...}}", where)
        kind = tool.get("type")
        if kind != "function":
            raise FieldError(f"{where}.type={kind!r} is not supported; expected 'function' (the only tool type "
                             "this server calls)", f"{where}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise FieldError(f"{where}.function is missing or not an object; expected {{'name': ..., "
                             "'parameters': {...}}", f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise FieldError(f"{where}.function.name={name!r}: expected 1-128 letters, digits, '_', '.', ':' or '-'",
                             f"{where}.function.name")
        if name in names:
            raise FieldError(f"{where}.function.name={name!r} is declared twice; tool names must be unique",
                             f"{where}.function.name")
        names.add(name)
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise FieldError(f"{where}.function.description is a {type(desc).__name__}; expected a string",
                             f"{where}.function.description")
        fn = dict(fn)
        if fn.get("parameters") is not None:
            fn["parameters"] = check_schema(fn["parameters"], f"{where}.function.parameters")
        out.append({**tool, "function": fn})
    return out


def constraint_of(body: Any, *, chat: bool) -> Constraint:
    """The request's :class:`Constraint` (``body``: a validated request with the fields as attributes;
    ``chat``: a chat request, where tools are possible). Raises FieldError naming the bad field."""
    c = Constraint()
    get = (lambda n: getattr(body, n, None) if hasattr(body, n) else (getattr(body, "model_extra", None) or {}).get(n))
    tools = get("tools")
    if tools is not None and not chat:
        raise FieldError("tools are a chat completions field; a completion has no template to declare them to", "tools")
    c.tools = _tools(tools) or None
    choice = get("tool_choice")
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise FieldError(f"tool_choice={json.dumps(choice)[:80]}: expected 'auto', 'none', 'required' or "
                             "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
        named = [t for t in c.tools or () if t["function"]["name"] == name]
        if not named:
            raise FieldError(f"tool_choice names the function {name!r}, which is not in tools "
                             f"({', '.join(t['function']['name'] for t in c.tools or ()) or 'no tools given'})",
                             "tool_choice")
        c.tools, c.tool_choice, c.parallel_tool_calls, c.forced = named, "required", False, name
    elif choice in ("auto", "none", "required"):
        c.tool_choice = choice
        if choice == "required" and not c.tools:
            raise FieldError("tool_choice='required' needs tools", "tool_choice")
    else:
        raise FieldError(f"tool_choice={choice!r}: expected 'auto', 'none', 'required' or a named function",
                         "tool_choice")
    parallel = get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise FieldError(f"parallel_tool_calls={parallel!r}: expected true or false", "parallel_tool_calls")
    if c.forced is None and parallel is not None:
        c.parallel_tool_calls = parallel

    schema, schema_param = get("json_schema"), "json_schema"
    fmt = get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict):
            raise FieldError(f"response_format is a {type(fmt).__name__}; expected an object with a 'type'",
                             "response_format")
        kind = fmt.get("type", "text")
        if kind == "json_object":
            if schema is not None:
                raise FieldError("json_schema and response_format were both given; send one", "json_schema")
            schema, schema_param = fmt.get("schema") or {}, "response_format.schema"
        elif kind == "json_schema":
            if schema is not None:
                raise FieldError("json_schema and response_format were both given; send one", "json_schema")
            wrapper = fmt.get("json_schema")
            if not isinstance(wrapper, dict):
                raise FieldError("response_format.json_schema is missing or not an object; expected {'name': ..., "
                                 "'schema': {...}}", "response_format.json_schema")
            schema, schema_param = wrapper.get("schema") or {}, "response_format.json_schema.schema"
        elif kind != "text":
            raise FieldError(f"response_format.type={kind!r}: expected 'text', 'json_object' or 'json_schema'",
                             "response_format.type")
    grammar = get("grammar")
    if grammar is not None and not isinstance(grammar, str):
        raise FieldError(f"grammar is a {type(grammar).__name__}; expected GBNF text", "grammar")
    if schema is not None and grammar:
        raise FieldError("json_schema and grammar were both given; send one", "grammar")
    if (schema is not None or grammar) and c.uses_tools:
        raise FieldError("a grammar or JSON schema cannot be combined with tools (the tool calls have their own "
                         "grammar); drop it or set tool_choice to 'none'", schema_param if schema is not None else "grammar")
    if schema is not None:
        c.json_schema, c.schema_param = check_schema(schema, schema_param), schema_param
    if grammar:
        if len(grammar.encode("utf-8", "surrogatepass")) > MAX_GRAMMAR_BYTES:
            raise FieldError(f"grammar is longer than {MAX_GRAMMAR_BYTES} bytes", "grammar")
        try:
            check_grammar(grammar)
        except GrammarError as exc:
            raise FieldError(f"grammar: {exc}", "grammar") from None
        c.grammar = grammar
    return c
