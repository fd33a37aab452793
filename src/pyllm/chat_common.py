"""llama.cpp's own chat library (``common/chat.h`` of the pinned tree), compiled into pyllm: chat templates
rendered by llama.cpp's Jinja engine together with everything llama-server derives from them for tool calls
and structured output, the parsers that turn a model's reply back into content, reasoning and tool calls,
and JSON schema to GBNF grammar.

- :class:`ChatTemplates` (``common_chat_templates``): :meth:`~ChatTemplates.apply` renders an OpenAI-style
  request (messages, tools, tool_choice, json_schema ...) into a :class:`ChatParams` (``common_chat_params``):
  the prompt, the grammar that constrains the reply, its lazy triggers, stop strings, and the parser;
- :class:`ChatParser` (``common_chat_parser_params`` + ``common_chat_parse``): a reply's text to a
  :class:`ParsedMessage`; :meth:`~ChatParser.update` streams it as llama-server does
  (``task_result_state::update_chat_msg``: the text so far parsed with ``is_partial``, the changes as
  :class:`MessageDelta` values from ``common_chat_msg_diff::compute_diffs``);
- :func:`json_schema_to_grammar` and :func:`check_grammar`.

The logic is llama.cpp's; this module turns Python values into the JSON its C glue takes (``glue_chat.cpp``)
and its answers into dataclasses, and raises pyllm's exceptions with llama.cpp's own message. llama.cpp's
``common`` log lines reach the ``pyllm.native`` logger like its other log lines.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from pyllm import _runtime
from pyllm._ffi import ffi, lib
from pyllm._handle import NativeHandle
from pyllm.errors import BrokenChatTemplateError, ChatTemplateError, ConfigError, GrammarError, ToolCallParseError

#: ``tool_choice`` values llama.cpp accepts (``common_chat_tool_choice_parse_oaicompat``).
TOOL_CHOICES = ("auto", "none", "required")
#: ``reasoning_format`` values (``common_reasoning_format_from_name``); "auto" is llama-server's default
#: behaviour: reasoning goes to ``reasoning_content``.
REASONING_FORMATS = ("none", "auto", "deepseek", "deepseek-legacy")


# ---------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GrammarTrigger:
    """One lazy-grammar trigger (``common_grammar_trigger``): the grammar starts constraining the reply once
    this appears in it. ``type``: "word" (``value`` is literal text), "pattern" (a regex searched in the text
    generated so far), "pattern_full" (a regex the whole text so far must match) or "token" (``token``, a
    token id; -1 for the other types). ``regex``: what llama.cpp's ``common_sampler_init`` hands
    ``llama_sampler_init_grammar_lazy_patterns`` for it (a word escaped, a full pattern anchored; "" for a token)."""

    type: str
    value: str
    token: int
    regex: str


@dataclass(frozen=True)
class ChatParams:
    """``common_chat_params``: what llama.cpp derives from a template and a request.

    ``format``: the parser's format name (``common_chat_format_name``: "peg-native" ...); ``prompt``: the rendered prompt text;
    ``grammar``: GBNF for the reply ("" when unconstrained), applied from the first token unless
    ``grammar_lazy`` (then only after one of ``grammar_triggers`` appears); ``preserved_tokens``: token texts
    (``<tool_call>`` ...) llama-server keeps in the output text and turns single-token trigger words into token
    triggers with; ``additional_stops``: stop strings to add to the request's; ``generation_prompt``: what the
    template put at the start of the reply (the parser reads it before the reply; a non-lazy grammar is
    advanced past it); ``supports_thinking`` / ``thinking_start_tag`` / ``thinking_end_tags``: the template's
    reasoning block; ``parser``: the serialized PEG parser, handed to :class:`ChatParser` as is."""

    format: str
    prompt: str
    grammar: str
    grammar_lazy: bool
    grammar_triggers: tuple[GrammarTrigger, ...]
    preserved_tokens: tuple[str, ...]
    additional_stops: tuple[str, ...]
    generation_prompt: str
    supports_thinking: bool
    thinking_start_tag: str
    thinking_end_tags: tuple[str, ...]
    parser: str

    def make_parser(self, *, assign_tool_call_ids: bool = True) -> "ChatParser":
        """A :class:`ChatParser` for replies to this prompt (llama.cpp's ``common_chat_parser_params(params)``)."""
        return ChatParser(self.format, generation_prompt=self.generation_prompt, parser=self.parser,
                          assign_tool_call_ids=assign_tool_call_ids)

    def grammar_sampling(self, model: Any) -> dict:
        """The grammar fields of :class:`pyllm.sampling.SamplingParams` for this prompt, as llama-server sets
        them (``tools/server/server-schema.cpp``, ``grammar_triggers`` / ``preserved_tokens``): a trigger word
        that is a single token of ``model`` (a preserved token such as ``<tool_call>``) becomes a token
        trigger, other words and patterns become regexes; a non-lazy grammar is advanced past the generation
        prompt. ``model``: anything with ``tokenize(text, add_special=, parse_special=)``. Empty without a
        grammar. Raises GrammarError for a single-token trigger word that is not a preserved token (llama-server
        refuses those too)."""
        if not self.grammar:
            return {}
        if not self.grammar_lazy:
            return {"grammar": self.grammar, "grammar_lazy": False, "grammar_prefill": self.generation_prompt}
        preserved = set()
        for text in self.preserved_tokens:
            ids = model.tokenize(text, add_special=False, parse_special=True)
            if len(ids) == 1:
                preserved.add(ids[0])
        patterns: list[str] = []
        tokens: list[int] = []
        for t in self.grammar_triggers:
            if t.type == "word":
                ids = model.tokenize(t.value, add_special=False, parse_special=True)
                if len(ids) == 1:
                    if ids[0] not in preserved:
                        raise GrammarError(f"grammar trigger word {t.value!r} is one token ({ids[0]}) but not a "
                                           "preserved token of the template")
                    tokens.append(ids[0])
                    continue
            if t.type == "token":
                tokens.append(t.token)
            else:
                patterns.append(t.regex)
        if not patterns and not tokens:
            raise GrammarError(f"the {self.format} template gave a lazy grammar without triggers")
        return {"grammar": self.grammar, "grammar_lazy": True, "grammar_trigger_patterns": tuple(patterns),
                "grammar_trigger_tokens": tuple(tokens)}


@dataclass(frozen=True)
class ToolCall:
    """One tool call of a reply: ``name``, ``arguments`` (JSON text, as the model wrote it, possibly
    incomplete while streaming) and ``id`` ("" unless the format carries one or :meth:`ChatParser.update`
    assigned one)."""

    name: str
    arguments: str
    id: str = ""


@dataclass(frozen=True)
class ParsedMessage:
    """A reply split by llama.cpp's parser (``common_chat_msg``): ``content``, ``reasoning_content`` and
    ``tool_calls``."""

    content: str = ""
    reasoning_content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    role: str = "assistant"

    def to_openai(self) -> dict:
        """The reply as an OpenAI chat completion ``message``: ``content`` is None when the reply is only tool
        calls; ``reasoning_content`` only when there is some; ``tool_calls`` in OpenAI's shape."""
        m: dict = {"role": self.role,
                   "content": None if (self.tool_calls and not self.content) else self.content}
        if self.reasoning_content:
            m["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            m["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                               for c in self.tool_calls]
        return m


@dataclass(frozen=True)
class MessageDelta:
    """One change between two parses of a growing reply (``common_chat_msg_diff``): text appended to the
    content or the reasoning, or to tool call ``tool_call_index`` (``tool_call``: its ``name`` and ``id`` when
    they are new, else "", and the ``arguments`` text appended). ``tool_call_index`` is None for text."""

    content_delta: str = ""
    reasoning_content_delta: str = ""
    tool_call_index: Optional[int] = None
    tool_call: Optional[ToolCall] = None


def _message(d: Mapping) -> ParsedMessage:
    return ParsedMessage(content=d["content"], reasoning_content=d["reasoning_content"], role=d["role"],
                         tool_calls=tuple(ToolCall(c["name"], c["arguments"], c["id"]) for c in d["tool_calls"]))


def _delta(d: Mapping) -> MessageDelta:
    tc = d["tool_call_delta"]
    return MessageDelta(content_delta=d["content_delta"], reasoning_content_delta=d["reasoning_content_delta"],
                        tool_call_index=d["tool_call_index"],
                        tool_call=None if tc is None else ToolCall(tc["name"], tc["arguments"], tc["id"]))


# ---------------------------------------------------------------------------------------------------
# the C glue's conventions
# ---------------------------------------------------------------------------------------------------
def _take(ptr) -> str:
    """The text the glue handed out, freed."""
    if ptr == ffi.NULL:
        return ""
    try:
        return ffi.string(ptr).decode("utf-8", "replace")
    finally:
        lib.pyllm_str_free(ptr)


def _call(fn, *args) -> tuple[int, str]:
    """Call a glue function whose last argument is ``char ** out``: (rc, text)."""
    out = ffi.new("char **")
    rc = fn(*args, out)
    text = _take(out[0])
    _runtime.raise_pending()
    return int(rc), text


def _encode(value: Any, what: str, error=ChatTemplateError) -> bytes:
    """``value`` as UTF-8 JSON text for the glue; ``what`` names it in the error."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise error(f"{what} cannot be sent as JSON: {exc}") from None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise error(f"{what} has a character that is not valid Unicode text ({exc.object[exc.start:exc.end]!r}, "
                    "a lone surrogate)") from None


def _utf8(text: str, what: str, error) -> bytes:
    if not isinstance(text, str):
        raise error(f"{what} is a {type(text).__name__}; expected a str")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise error(f"{what} has a character that is not valid Unicode text ({exc.object[exc.start:exc.end]!r}, "
                    "a lone surrogate)") from None


# ---------------------------------------------------------------------------------------------------
# templates
# ---------------------------------------------------------------------------------------------------
class ChatTemplates(NativeHandle):
    """A chat template compiled by llama.cpp (``common_chat_templates_init`` with the template text).

    ``source``: the Jinja text; ``bos_token`` / ``eos_token``: the model's, as text (the template's
    ``bos_token`` / ``eos_token`` variables); ``name``: how errors name the template. Raises
    BrokenChatTemplateError when llama.cpp cannot parse it, ChatTemplateError for an empty source.
    close() frees it (``with`` works); use it from one thread at a time.

    llama.cpp's Jinja engine has no time or size limit (unlike :mod:`pyllm.chat`'s sandbox): a template that
    never ends hangs :meth:`apply` and :attr:`caps`, as it hangs llama-server. Use it with the model's own or
    a shipped template, not with template text from a request."""

    _kind = "chat template"

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", name: str = "template text") -> None:
        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError(f"chat template {name} is empty or not a str ({type(source).__name__}); "
                                    "expected the Jinja text of a chat template")
        for what, v in (("bos_token", bos_token), ("eos_token", eos_token)):
            if not isinstance(v, str):
                raise ChatTemplateError(f"{what}={v!r} is a {type(v).__name__}; expected a str")
        _runtime.ensure_backend()
        self.name = name
        params = _encode({"source": source, "bos_token": bos_token, "eos_token": eos_token}, f"chat template {name}")
        out = ffi.new("pyllm_chat_templates **")
        err = ffi.new("char **")
        rc = lib.pyllm_chat_templates_init(params, out, err)
        message = _take(err[0])
        _runtime.raise_pending()
        if rc != 0 or out[0] == ffi.NULL:
            raise BrokenChatTemplateError(f"chat template {name} does not compile in llama.cpp's Jinja engine: "
                                          f"{message or 'no reason given'}")
        super().__init__(out[0], lib.pyllm_chat_templates_free)
        self._caps: Optional[dict[str, bool]] = None

    @property
    def caps(self) -> dict[str, bool]:
        """llama.cpp's capabilities of the template, found by running it on probe conversations
        (``common_chat_templates_get_caps``): ``supports_tools``, ``supports_tool_calls``,
        ``supports_object_arguments`` (it reads ``tool_calls[].function.arguments`` as a mapping),
        ``supports_parallel_tool_calls``, ``supports_system_role``, ``supports_preserve_reasoning`` ..."""
        if self._caps is None:
            rc, text = _call(lib.pyllm_chat_templates_caps, self.ptr)
            if rc != 0:
                raise ChatTemplateError(f"chat template {self.name}: llama.cpp could not read its capabilities: {text}")
            self._caps = {k: bool(v) for k, v in json.loads(text).items()}
        return dict(self._caps)

    def apply(
        self,
        messages: Sequence[Mapping],
        *,
        tools: Optional[Sequence[Mapping]] = None,
        tool_choice: str = "auto",
        parallel_tool_calls: Optional[bool] = None,
        json_schema: Optional[Mapping] = None,
        grammar: Optional[str] = None,
        enable_thinking: bool = True,
        reasoning_format: str = "auto",
        add_generation_prompt: bool = True,
        continue_final_message: Union[bool, str, None] = None,
        chat_template_kwargs: Optional[Mapping[str, Any]] = None,
        now: Union[datetime, float, None] = None,
    ) -> ChatParams:
        """``common_chat_templates_apply`` for an OpenAI-style request: a :class:`ChatParams`.

        ``messages``: OpenAI chat messages (``content`` a str, None or text parts; assistant ``tool_calls`` with
        ``function.arguments`` as JSON text or an object; ``tool`` messages with ``tool_call_id``);
        ``tools``: OpenAI function tools; ``tool_choice``: one of :data:`TOOL_CHOICES`;
        ``parallel_tool_calls``: None = what the template supports (llama-server's default);
        ``json_schema``: a JSON schema the reply must follow (an empty one means any object, as llama-server
        reads it), or ``grammar``: GBNF text, not both, and neither with tools unless ``tool_choice="none"``;
        ``enable_thinking`` / ``reasoning_format`` (:data:`REASONING_FORMATS`): the reasoning block;
        ``continue_final_message``: True / "content" / "reasoning_content" continue the last assistant message
        (then ``add_generation_prompt`` must be False); ``chat_template_kwargs``: extra template variables;
        ``now``: the time templates print (default: now).

        Raises ConfigError for a bad option value, ChatTemplateError when llama.cpp refuses the messages or
        tools (its message, naming the bad value) or the template fails on them."""
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or \
                not all(isinstance(m, Mapping) for m in messages):
            raise ChatTemplateError(f"messages is {type(messages).__name__} {messages!r:.80}; expected a list of "
                                    "message dicts")
        if not messages:
            raise ChatTemplateError("messages is empty; expected at least one message dict")
        if tools is not None and (isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence)
                                  or not all(isinstance(t, Mapping) for t in tools)):
            raise ChatTemplateError(f"tools is {type(tools).__name__} {tools!r:.80}; expected a list of "
                                    "{'type': 'function', 'function': {...}} dicts or None")
        if tool_choice not in TOOL_CHOICES:
            raise ConfigError(f"tool_choice={tool_choice!r}; expected one of {', '.join(TOOL_CHOICES)}")
        if reasoning_format not in REASONING_FORMATS:
            raise ConfigError(f"reasoning_format={reasoning_format!r}; expected one of {', '.join(REASONING_FORMATS)}")
        for name, v in (("enable_thinking", enable_thinking), ("add_generation_prompt", add_generation_prompt)):
            if not isinstance(v, bool):
                raise ConfigError(f"{name}={v!r}; expected True or False")
        if parallel_tool_calls is None:
            parallel_tool_calls = self.caps.get("supports_parallel_tool_calls", False)
        elif not isinstance(parallel_tool_calls, bool):
            raise ConfigError(f"parallel_tool_calls={parallel_tool_calls!r}; expected True, False or None")
        if json_schema is not None and not isinstance(json_schema, Mapping):
            raise ConfigError(f"json_schema is a {type(json_schema).__name__}; expected a JSON schema object (a dict)")
        if grammar is not None and not isinstance(grammar, str):
            raise ConfigError(f"grammar is a {type(grammar).__name__}; expected GBNF text (a str)")
        if json_schema is not None and grammar:
            raise ConfigError("json_schema and grammar were both given; expected at most one of them")
        if tools and tool_choice != "none" and grammar:
            raise ConfigError("a grammar cannot be combined with tools (llama.cpp constrains tool calls with its own "
                              "grammar); drop the grammar or set tool_choice='none'")
        if continue_final_message not in (None, False, True, "content", "reasoning_content"):
            raise ConfigError(f"continue_final_message={continue_final_message!r}; expected True, 'content', "
                              "'reasoning_content', False or None")
        if continue_final_message and add_generation_prompt:
            raise ConfigError("continue_final_message and add_generation_prompt cannot both be set; "
                              "continuing the last message adds no generation prompt")
        if chat_template_kwargs is not None and (not isinstance(chat_template_kwargs, Mapping)
                                                 or not all(isinstance(k, str) for k in chat_template_kwargs)):
            raise ConfigError(f"chat_template_kwargs={chat_template_kwargs!r:.80}; expected a dict with str keys")
        if isinstance(now, datetime):
            now = now.timestamp()
        if now is not None and (isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now)
                                or now < 0):
            raise ConfigError(f"now={now!r}; expected a datetime or seconds since the Unix epoch")
        schema = dict(json_schema) if json_schema is not None else None
        if schema is not None and not schema:
            schema = {"type": "object"}  # llama-server: an absent or empty schema means any object
        inputs = {
            "messages": list(messages), "tools": list(tools) if tools else None, "tool_choice": tool_choice,
            "parallel_tool_calls": parallel_tool_calls, "json_schema": schema, "grammar": grammar or "",
            "enable_thinking": enable_thinking, "reasoning_format": reasoning_format,
            "add_generation_prompt": add_generation_prompt,
            "continue_final_message": continue_final_message if continue_final_message else None,
            "chat_template_kwargs": dict(chat_template_kwargs) if chat_template_kwargs else None, "now": now,
        }
        rc, text = _call(lib.pyllm_chat_templates_apply, self.ptr, _encode(inputs, "the chat request"))
        if rc != 0:
            raise ChatTemplateError(f"chat template {self.name}: llama.cpp refused the request: {text}")
        d = json.loads(text)
        return ChatParams(
            format=d["format"], prompt=d["prompt"], grammar=d["grammar"], grammar_lazy=d["grammar_lazy"],
            grammar_triggers=tuple(GrammarTrigger(t["type"], t["value"], t["token"], t["regex"])
                                   for t in d["grammar_triggers"]),
            preserved_tokens=tuple(d["preserved_tokens"]), additional_stops=tuple(d["additional_stops"]),
            generation_prompt=d["generation_prompt"], supports_thinking=d["supports_thinking"],
            thinking_start_tag=d["thinking_start_tag"], thinking_end_tags=tuple(d["thinking_end_tags"]),
            parser=d["parser"])


# ---------------------------------------------------------------------------------------------------
# parsing replies
# ---------------------------------------------------------------------------------------------------
class ChatParser(NativeHandle):
    """llama.cpp's parser of a reply (``common_chat_parser_params`` with its PEG parser loaded): usually
    ``ChatParams.make_parser()``. ``format``: a ``common_chat_format_name`` ("Content-only", "peg-native" ...); ``generation_prompt``: what the
    template put at the start of the reply (parsed before it); ``parser``: ``ChatParams.parser``, as is.

    :meth:`parse` is stateless; :meth:`update` keeps one reply's stream state (one parser per reply, one
    thread at a time). ``assign_tool_call_ids``: :meth:`update` gives each tool call an id when it first
    appears, as llama-server does (and keeps it, even if the format writes its own id later); False leaves
    the ids as parsed. Raises ConfigError for an unknown format or a parser text llama.cpp cannot load."""

    _kind = "chat parser"

    def __init__(self, format: str = "Content-only", *, generation_prompt: str = "", parser: str = "",
                 assign_tool_call_ids: bool = True) -> None:
        for what, v in (("format", format), ("generation_prompt", generation_prompt), ("parser", parser)):
            if not isinstance(v, str):
                raise ConfigError(f"{what} is a {type(v).__name__}; expected a str")
        if not isinstance(assign_tool_call_ids, bool):
            raise ConfigError(f"assign_tool_call_ids={assign_tool_call_ids!r}; expected True or False")
        _runtime.ensure_backend()
        params = _encode({"format": format, "generation_prompt": generation_prompt, "parser": parser,
                          "assign_tool_call_ids": assign_tool_call_ids}, "the chat parser parameters", ConfigError)
        out = ffi.new("pyllm_chat_parser **")
        err = ffi.new("char **")
        rc = lib.pyllm_chat_parser_init(params, out, err)
        message = _take(err[0])
        _runtime.raise_pending()
        if rc != 0 or out[0] == ffi.NULL:
            raise ConfigError(f"llama.cpp cannot make a chat parser (format {format!r}): {message or 'no reason given'} "
                              "(format and parser are ChatParams.format and ChatParams.parser, unchanged)")
        super().__init__(out[0], lib.pyllm_chat_parser_free)
        self.format = format

    def parse(self, text: str, *, is_partial: bool = False) -> ParsedMessage:
        """``common_chat_parse(text, is_partial)``: ``text`` is the reply so far (without the generation
        prompt); ``is_partial`` while more may follow (an unfinished tool call is then returned as far as it
        goes). Raises ToolCallParseError when a complete reply does not match the format."""
        data = _utf8(text, "the reply text", ToolCallParseError)
        rc, out = _call(lib.pyllm_chat_parse, self.ptr, data, len(data), bool(is_partial))
        if rc != 0:
            raise ToolCallParseError(f"the reply does not parse as {self.format}: {out}")
        return _message(json.loads(out))

    def update(self, text_added: str, *, is_partial: bool = True) -> tuple[ParsedMessage, list[MessageDelta]]:
        """Streaming, as llama-server's ``update_chat_msg``: appends ``text_added`` to this parser's reply,
        parses the whole, gives new tool calls an id (32 letters and digits, llama-server's
        ``gen_tool_call_id``; unless ``assign_tool_call_ids=False``) and returns (the message so far, the deltas since the last update). The last
        call has ``is_partial=False``. The deltas of all calls add up to the final message. Raises
        ToolCallParseError as :meth:`parse` does (the state is then unchanged)."""
        data = _utf8(text_added, "the reply text", ToolCallParseError)
        rc, out = _call(lib.pyllm_chat_parser_update, self.ptr, data, len(data), bool(is_partial))
        if rc != 0:
            raise ToolCallParseError(f"the reply does not parse as {self.format}: {out}")
        d = json.loads(out)
        return _message(d["message"]), [_delta(x) for x in d["diffs"]]


# ---------------------------------------------------------------------------------------------------
# grammars
# ---------------------------------------------------------------------------------------------------
def json_schema_to_grammar(schema: Union[Mapping, bool], *, force_gbnf: bool = False) -> str:
    """GBNF text for a JSON schema (llama.cpp's ``json_schema_to_grammar``, as llama-server's ``json_schema``
    field uses it). ``schema``: a JSON schema (a dict; True means anything). Raises GrammarError with
    llama.cpp's reason for a schema it cannot convert (an unknown ``$ref``, a bad ``pattern`` ...)."""
    if not isinstance(schema, (Mapping, bool)):
        raise GrammarError(f"json_schema is a {type(schema).__name__}; expected a JSON schema object (a dict)")
    rc, text = _call(lib.pyllm_json_schema_to_grammar, _encode(schema, "json_schema", GrammarError), bool(force_gbnf))
    if rc != 0:
        raise GrammarError(f"json_schema cannot be turned into a grammar: {text}")
    return text


_NOT_SCHEMAS = frozenset({"const", "enum", "default", "examples"})   # values, not subschemas


def _patterns(schema: Any):
    if isinstance(schema, Mapping):
        if isinstance(schema.get("pattern"), str):
            yield schema["pattern"]
        for key, value in schema.items():
            if key not in _NOT_SCHEMAS:
                yield from _patterns(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from _patterns(value)


def unsupported_patterns(schema: Union[Mapping, bool]) -> list[str]:
    """The string ``pattern`` regexes of ``schema`` that llama.cpp's converter cannot express as a grammar,
    in schema order. For these ``json_schema_to_grammar`` logs "JSON schema conversion was incomplete ...
    accepting any string" and constrains the string to nothing but JSON string syntax, so a reply would not
    honour the pattern. Found by llama.cpp's own converter: a pattern is unsupported when its grammar is the
    one the converter falls back to (that of an unanchored pattern). Patterns under ``const``/``enum``/
    ``default``/``examples`` are values and are skipped."""
    found = list(dict.fromkeys(_patterns(schema)))
    if not found:
        return []
    fallback = json_schema_to_grammar({"type": "string", "pattern": "unanchored"})
    out = []
    for pattern in found:
        try:
            grammar = json_schema_to_grammar({"type": "string", "pattern": pattern})
        except GrammarError:
            continue   # an invalid regex fails the whole schema's conversion, with llama.cpp's reason
        if grammar == fallback:
            out.append(pattern)
    return out


def check_grammar(grammar: str) -> None:
    """Raise GrammarError, with llama.cpp's GBNF parser's reason (``expecting ::= at ...``), unless ``grammar``
    parses and defines ``root``."""
    data = _utf8(grammar, "grammar", GrammarError)
    if b"\0" in data:
        raise GrammarError(f"grammar has a NUL character (at byte {data.index(0)}); GBNF text cannot hold one")
    rc, text = _call(lib.pyllm_grammar_check, data, b"root")
    if rc != 0:
        raise GrammarError(f"grammar does not parse: {text}")


@dataclass(frozen=True)
class GrammarMatch:
    """How far a text matches a grammar: ``matched`` (all of it, and the grammar may end there),
    ``incomplete`` (all of it was accepted but the grammar expects more), ``matched_chars`` (characters
    accepted before the first one the grammar rejects)."""

    matched: bool
    incomplete: bool
    matched_chars: int


def grammar_match(grammar: str, text: str) -> GrammarMatch:
    """Match ``text`` (characters, not tokens) against a GBNF ``grammar`` with llama.cpp's grammar engine, as
    llama.cpp's own tests check that a grammar admits an output. Raises GrammarError for a grammar that does
    not parse."""
    check_grammar(grammar)
    data = _utf8(text, "text", GrammarError)  # refuses lone surrogates
    cpts = ffi.new("uint32_t[]", [ord(c) for c in data.decode("utf-8")] or [0])
    rc, out = _call(lib.pyllm_grammar_match, grammar.encode("utf-8"), cpts, len(text))
    if rc != 0:
        raise GrammarError(f"grammar cannot be matched: {out}")
    d = json.loads(out)
    return GrammarMatch(d["matched"], d["incomplete"], d["matched_chars"])


__all__ = [
    "ChatParams", "ChatParser", "ChatTemplates", "GrammarMatch", "GrammarTrigger", "MessageDelta", "ParsedMessage",
    "REASONING_FORMATS", "TOOL_CHOICES", "ToolCall", "check_grammar", "grammar_match", "json_schema_to_grammar",
    "unsupported_patterns",
]
