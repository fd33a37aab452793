"""Chat templates that are right for the model: the GGUF's own Jinja template, rendered as Hugging Face's
``apply_chat_template`` renders it, plus the split of a reply into reasoning and content.

Where a template comes from (:func:`resolve_template`):

- ``None``: the GGUF's ``tokenizer.chat_template``;
- a name: ``glm4`` (the model's own GLM template, else the shipped GLM-4.7-Flash one), the stem of a
  template shipped with llama.cpp's ``models/templates`` (``Qwen3.5-4B``, ``openai-gpt-oss-120b`` ...),
  or one of llama.cpp's built-in names (``chatml``, ``gemma``, ``llama3`` ...), which llama.cpp's own
  pattern matcher (``llama_chat_apply_template``) renders;
- a path to a ``.jinja`` file, or the template text itself.

Templates run in ``jinja2.sandbox.ImmutableSandboxedEnvironment`` with a time and an output-size limit,
so a template can neither touch Python internals nor hang or exhaust memory; every failure is a
:class:`~pyllm.errors.ChatTemplateError` naming the template's source and Jinja's message.

A conversation reaches a template as llama.cpp hands it over (``common/chat.cpp``): a ``content`` of None
becomes "", and tool-call ``arguments`` sent as JSON text (OpenAI's shape) become objects for templates that
read them as a mapping (found with llama.cpp's probe, run in this sandbox).

This module sits just above ``_ffi`` and ``errors``: it reads a model only through its public methods
(``chat_template()``, ``bos``, ``eos``, ``token_to_piece``, ``path``), so ``model`` can use it.
"""
from __future__ import annotations

import difflib
import functools
import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from pyllm._ffi import ffi, lib
from pyllm.errors import BrokenChatTemplateError, ChatTemplateError

logger = logging.getLogger("pyllm")

#: Rendering stops with a ChatTemplateError after this many seconds ...
RENDER_SECONDS = 10.0
#: ... or once the prompt text grows past this many characters.
MAX_OUTPUT_CHARS = 8 * 1024 * 1024

GLM4_NAME = "glm4"
GLM4_FALLBACK = "GLM-4.7-Flash"
_PACKAGE_TEMPLATES = Path(__file__).resolve().parent / "templates"
_SOURCE_TEMPLATES = Path(__file__).resolve().parents[2] / "vendor" / "llama.cpp" / "models" / "templates"


# ---------------------------------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------------------------------
def templates_dir() -> Optional[Path]:
    """Where the shipped ``.jinja`` templates are: the installed package's ``pyllm/templates`` first,
    then ``vendor/llama.cpp/models/templates`` of a source tree; None when neither exists."""
    for d in (_PACKAGE_TEMPLATES, _SOURCE_TEMPLATES):
        if d.is_dir() and any(d.glob("*.jinja")):
            return d
    return None


def shipped_templates() -> dict[str, Path]:
    """Stem -> path of every shipped template."""
    d = templates_dir()
    return {} if d is None else {p.stem: p for p in sorted(d.glob("*.jinja"))}


def builtin_templates() -> list[str]:
    """llama.cpp's built-in names (``llama_chat_builtin_templates``), rendered by its pattern matcher."""
    n = int(lib.llama_chat_builtin_templates(ffi.NULL, 0))
    arr = ffi.new("const char *[]", n)
    lib.llama_chat_builtin_templates(arr, n)
    return [ffi.string(arr[i]).decode() for i in range(n)]


def available_templates() -> list[str]:
    """Every name :func:`resolve_template` accepts: ``glm4``, the shipped templates, llama.cpp's built-ins."""
    names = [GLM4_NAME] + list(shipped_templates())
    seen = set(names)
    return names + [n for n in builtin_templates() if n not in seen]


# ---------------------------------------------------------------------------------------------------
# the Jinja environment (Hugging Face's apply_chat_template semantics)
# ---------------------------------------------------------------------------------------------------
class _TemplateRaised(Exception):
    """raise_exception() in a template."""


class _Limit(Exception):
    """The render ran past its time or size limit."""


class _Budget:
    """Time and size limits of one render; checked by every range step, call and operator."""

    def __init__(self, seconds: float, max_chars: int) -> None:
        self.deadline = time.monotonic() + seconds
        self.seconds = seconds
        self.max_chars = max_chars

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _Limit(f"rendering took longer than {self.seconds:g} s (a template that never ends?)")

    def size(self, n: int) -> None:
        if n > self.max_chars:
            raise _Limit(f"rendering produced more than {self.max_chars} characters (a template that never ends?)")


_local = threading.local()   # the budget of the render in progress on this thread (see _render)


def _budget() -> Optional[_Budget]:
    return getattr(_local, "budget", None)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Hugging Face's tojson: plain json.dumps (Jinja's own escapes HTML and has no ensure_ascii). A filter
    # chain such as `tools | map(attribute='function') | tojson` hands it a generator, which llama.cpp's Jinja
    # engine (where such templates are written and tested) treats as the list it yields.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys,
                      default=_json_iterable)


def _json_iterable(value: Any) -> Any:
    import types

    if isinstance(value, (types.GeneratorType, map, filter)):
        return list(value)
    if isinstance(value, _ProbeArguments):
        return {k: value[k] for k in value}
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _raise_exception(message: str = "") -> None:
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=1)
def _environment():
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """Hugging Face's ``{% generation %}...{% endgeneration %}`` (assistant masks): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    class ChatEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "+"])

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
            b = _budget()
            if b is not None:
                b.tick()
            return super().call(__context, __obj, *args, **kwargs)

        def call_binop(self, context, operator, left, right):
            b = _budget()
            if b is not None:
                b.tick()
                if operator == "*":
                    for seq, n in ((left, right), (right, left)):
                        if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                            b.size(len(seq) * max(n, 0))
                elif operator == "**" and isinstance(right, int) and right > 4096:
                    raise _Limit(f"exponent {right} is too large for a chat template")
                elif operator == "+" and isinstance(left, (str, list)) and isinstance(right, (str, list)):
                    b.size(len(left) + len(right))
            return super().call_binop(context, operator, left, right)

    class CheckedRange(list):
        """range() for templates: a real list (len, indexing, |length work) whose iteration checks the budget."""

        def __iter__(self):
            b = _budget()
            for i in list.__iter__(self):
                if b is not None:
                    b.tick()
                yield i

    def checked_range(*args):
        r = range(*args)
        if len(r) > MAX_RANGE:
            raise _Limit(f"range of {len(r)} items is longer than the sandbox allows ({MAX_RANGE})")
        return CheckedRange(r)

    env = ChatEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["range"] = checked_range
    return env


@functools.lru_cache(maxsize=32)
def _compile(text: str, source: str):
    from jinja2 import TemplateError, TemplateSyntaxError

    try:
        return _environment().from_string(text)
    except TemplateSyntaxError as exc:
        raise BrokenChatTemplateError(f"chat template {source} has a syntax error at line {exc.lineno}: "
                                      f"{exc.message}") from None
    except TemplateError as exc:
        raise BrokenChatTemplateError(f"chat template {source} does not compile: {exc}") from None


# ---------------------------------------------------------------------------------------------------
# messages
# ---------------------------------------------------------------------------------------------------
def validate_messages(messages: Any) -> list[dict]:
    """Check the OpenAI-style message list; return it as a list of dicts (not copied deeply).

    Each message: a dict with a str ``role`` and ``content`` that is a str, None (an assistant turn
    with only tool calls) or a list of ``{"type": "text", "text": ...}`` parts. ``tool_calls``: a list of
    ``{"id": str, "type": "function", "function": {"name": str, "arguments": JSON text or a dict}}``;
    ``tool_call_id`` and ``name`` (of a ``tool`` message): str. Other keys are passed to the template.
    Raises ChatTemplateError naming the message, the field and what is accepted.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages is a {type(messages).__name__}; expected a list of "
                                "{'role': str, 'content': str} dicts")
    if not messages:
        raise ChatTemplateError("messages is empty; expected at least one {'role': ..., 'content': ...} dict")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatTemplateError(f"message {i} is {m!r} (a {type(m).__name__}); expected a dict with 'role' "
                                    "and 'content'")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise ChatTemplateError(f"message {i} has role={role!r}; expected a non-empty str such as "
                                    "'system', 'user', 'assistant' or 'tool'")
        if "content" not in m and not m.get("tool_calls"):
            raise ChatTemplateError(f"message {i} ({role}) has no 'content'; expected a str, None or a list of "
                                    "text parts")
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            if not isinstance(content, list):
                raise ChatTemplateError(f"message {i} ({role}) has content of type {type(content).__name__} "
                                        f"({content!r:.60}); expected a str, None or a list of "
                                        "{'type': 'text', 'text': str} parts")
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ChatTemplateError(f"message {i} ({role}) content part {j} is {part!r:.60}; expected "
                                            "{'type': 'text', 'text': str}")
        rc = m.get("reasoning_content")
        if rc is not None and not isinstance(rc, str):
            raise ChatTemplateError(f"message {i} ({role}) has reasoning_content of type {type(rc).__name__}; "
                                    "expected a str or None")
        if m.get("tool_calls") is not None:
            _validate_tool_calls(i, role, m["tool_calls"])
        for key in ("tool_call_id", "name"):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise ChatTemplateError(f"message {i} ({role}) has {key}={m[key]!r:.60} of type {type(m[key]).__name__}; "
                                        "expected a str")
        out.append(m)
    return out


_TOOL_CALL_SHAPE = ("{'id': str, 'type': 'function', 'function': {'name': str, 'arguments': JSON text or a dict}}")


def _validate_tool_calls(i: int, role: str, calls: Any) -> None:
    """OpenAI's shape of an assistant message's ``tool_calls`` (what llama.cpp's
    ``common_chat_msgs_parse_oaicompat`` reads); ``arguments`` is JSON text (OpenAI) or an object."""
    if isinstance(calls, (str, bytes)) or not isinstance(calls, Sequence):
        raise ChatTemplateError(f"message {i} ({role}) has tool_calls of type {type(calls).__name__}; expected a list "
                                f"of {_TOOL_CALL_SHAPE}")
    for j, call in enumerate(calls):
        where = f"message {i} ({role}) tool_calls[{j}]"
        if not isinstance(call, dict):
            raise ChatTemplateError(f"{where} is {call!r:.60} (a {type(call).__name__}); expected {_TOOL_CALL_SHAPE}")
        if call.get("type", "function") != "function":
            raise ChatTemplateError(f"{where} has type={call.get('type')!r}; only 'function' tool calls are supported")
        if call.get("id") is not None and not isinstance(call["id"], str):
            raise ChatTemplateError(f"{where} has id={call['id']!r:.60}; expected a str")
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise ChatTemplateError(f"{where} has function={fn!r:.60}; expected "
                                    "{'name': str, 'arguments': JSON text or a dict}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ChatTemplateError(f"{where}.function has name={fn.get('name')!r:.60}; expected a non-empty str")
        args = fn.get("arguments")
        if not isinstance(args, (str, dict)):
            raise ChatTemplateError(f"{where}.function has arguments={args!r:.60} of type {type(args).__name__}; "
                                    "expected JSON text (a str, as OpenAI sends it) or a dict")


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content)


# ---------------------------------------------------------------------------------------------------
# templates
# ---------------------------------------------------------------------------------------------------
@dataclass
class ChatTemplate:
    """A resolved chat template: Jinja ``text``, or a llama.cpp ``builtin`` name; ``source`` says where
    it came from (used in every error message). ``bos_token`` / ``eos_token``: the model's, when known."""

    source: str
    text: Optional[str] = None
    builtin: Optional[str] = None
    bos_token: str = ""
    eos_token: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def is_jinja(self) -> bool:
        return self.text is not None

    def check(self) -> None:
        """Compile a Jinja template now (a server does at start-up): a syntax error raises
        BrokenChatTemplateError naming the source and the line. A built-in name has nothing to compile."""
        if self.text is not None:
            _compile(self.text, self.source)

    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = True, tools: Optional[list] = None,
               seconds: float = RENDER_SECONDS, max_chars: int = MAX_OUTPUT_CHARS, **template_kwargs: Any) -> str:
        """The prompt text for ``messages``; ``template_kwargs`` (``enable_thinking``, ``reasoning_effort``,
        ``bos_token`` ...) are passed to the template as variables, as Hugging Face does."""
        msgs = validate_messages(messages)
        if tools is not None and not isinstance(tools, list):
            raise ChatTemplateError(f"tools is a {type(tools).__name__}; expected a list of tool definitions or None")
        if self.builtin is not None:
            return self._render_builtin(msgs, add_generation_prompt, tools, template_kwargs)
        tmpl = _compile(self.text, self.source)
        msgs = _history_for_template(msgs, self.text, self.source)
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, **self.extra, **template_kwargs,
                     "messages": msgs, "tools": tools, "add_generation_prompt": bool(add_generation_prompt)}
        return _render(tmpl, variables, self.source, seconds, max_chars)

    def render_prompt(self, messages: Sequence[dict], model: Any, *, add_generation_prompt: bool = True,
                      tools: Optional[list] = None, special_in_messages: bool = False,
                      **template_kwargs: Any) -> ChatPrompt:
        """``messages`` rendered (as :meth:`render`) and tokenized for ``model``: a :class:`ChatPrompt`.

        Only the template's own markup becomes control tokens. Text that came from the caller (every
        string in ``messages`` of any role, tool results, reasoning, tool-call arguments, ``tools`` and
        ``template_kwargs``) is tokenized as plain text, so a message cannot close its turn or forge
        another one by writing ``<end_of_turn>``/``<start_of_turn>``: the template renders with
        stand-ins for such text, the rendered prompt is split at the template's control tokens as
        llama.cpp's tokenizer splits it, and the stand-ins are put back inside the plain-text pieces.
        A conversation without control-token text gives exactly ``model.tokenize_chat(text)``.
        ``special_in_messages=True`` is llama-server's behaviour (the whole prompt parsed for special
        tokens, message text included): only for clients that rely on writing control tokens themselves.
        Raises ChatTemplateError as :meth:`render` does.
        """
        def render(msgs, hidden_tools, kwargs):
            text = self.render(msgs, add_generation_prompt=add_generation_prompt, tools=hidden_tools, **kwargs)
            generation_prompt = ""
            if add_generation_prompt:
                without = self.render(msgs, add_generation_prompt=False, tools=hidden_tools, **kwargs)
                if text.startswith(without):
                    generation_prompt = text[len(without):]
            return text, generation_prompt, None

        return render_safely(render, model, messages, tools, template_kwargs, special_in_messages=special_in_messages,
                             source=self.source)[0]

    def _render_builtin(self, msgs: list[dict], add_assistant: bool, tools: Optional[list], kwargs: dict) -> str:
        if tools:
            raise ChatTemplateError(f"chat template {self.source} is llama.cpp's built-in {self.builtin!r} format, "
                                    "which has no tools; use the model's Jinja template or a shipped one")
        if kwargs:
            logger.debug("built-in chat template %s ignores %s", self.builtin, ", ".join(sorted(kwargs)))
        turns = [(m["role"], _text_of(m.get("content"))) for m in msgs]
        # llama_chat_apply_template takes C strings: text after a NUL would vanish.
        for i, (role, text) in enumerate(turns):
            for what, value in (("role", role), ("content", text)):
                if "\0" in value:
                    raise ChatTemplateError(
                        f"message {i} ({role!r}) has a NUL character in its {what} (at index {value.index(chr(0))}); "
                        f"llama.cpp's built-in {self.builtin!r} chat format (chat template: {self.source}) takes C "
                        "strings and would drop the text after it")
        # A format places each role where it has a place for it, and leaves out the rest without a word
        # (gemma folds a system message into the next user turn, so a lone one vanishes; many formats
        # drop 'tool' or 'developer'). Which messages survive depends on the roles only: render markers first.
        probe = _apply_builtin(self.builtin, [(role, _marker(i)) for i, (role, _) in enumerate(turns)], add_assistant)
        for i, (role, text) in enumerate(turns):
            if text.strip() and _marker(i) not in probe:
                why = ("it puts a system message into the next user turn, and none follows"
                       if role == "system" and all(r != "user" for r, _ in turns[i + 1:]) else
                       "it has no place for that role there")
                raise ChatTemplateError(
                    f"message {i} (role {role!r}) would be dropped by llama.cpp's built-in {self.builtin!r} chat "
                    f"format (chat template: {self.source}): {why}; send the text in a message it keeps "
                    "(e.g. a 'user' one), or serve a Jinja template (--chat-template)")
        return _apply_builtin(self.builtin, turns, add_assistant)


class _ProbeArguments(Mapping):
    """Tool-call arguments that record whether a template read them as a mapping (an entry, its keys or
    items, a membership test, or ``tojson``)."""

    def __init__(self, data: dict) -> None:
        self._data = data
        self.used = False

    def __getitem__(self, key):
        self.used = True
        return self._data[key]

    def __iter__(self):
        self.used = True
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key) -> bool:
        self.used = True
        return key in self._data


@functools.lru_cache(maxsize=32)
def _reads_arguments_as_mapping(text: str) -> bool:
    """Whether a template reads ``tool_calls[].function.arguments`` as a mapping: llama.cpp's capability probe
    ``supports_object_arguments`` (common/jinja/caps.cpp: one tool call with arguments ``{"arg": "value"}``, then
    was ``arguments.arg`` used?), run here in pyllm's own sandbox, time-limited like every render, because
    llama.cpp's Jinja engine has no time or recursion limit. A template that fails on the probe reads nothing."""
    args = _ProbeArguments({"arg": "value"})
    messages = [
        {"role": "user", "content": "User message"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call00001", "type": "function", "function": {"name": "tool1", "arguments": args}}]},
        {"role": "tool", "content": "Tool response", "tool_call_id": "call00001"},
        {"role": "assistant", "content": "The tool response was 'tool response'"},
        {"role": "user", "content": "User message"},
    ]
    tools = [{"name": "tool", "type": "function", "function": {
        "name": "tool1", "description": "Tool description",
        "parameters": {"type": "object", "properties": {"arg": {"type": "string", "description": "Arg description"}},
                       "required": ["arg"]}}}]
    try:
        tmpl = _compile(text, "probe")
        _render(tmpl, {"bos_token": "", "eos_token": "", "messages": messages, "tools": tools,
                       "add_generation_prompt": False}, "probe", 2.0, MAX_OUTPUT_CHARS)
    except ChatTemplateError:
        return False
    return args.used


def _history_for_template(msgs: list[dict], text: str, source: str) -> list[dict]:
    """The conversation as llama.cpp hands it to a template (common/chat.cpp): ``content`` None or missing
    becomes "" (``common_chat_msg::to_json_oaicompat`` always writes a string, so templates that concatenate
    or search it work on tool-call turns), and tool-call ``arguments`` given as JSON text are parsed into
    objects for a template that reads them as a mapping (llama.cpp's ``workaround::func_args_not_string`` for
    templates with ``supports_object_arguments``; see :func:`_reads_arguments_as_mapping`). The caller's
    messages are not modified."""
    object_args = None  # probed only when some arguments are JSON text
    out = []
    for i, m in enumerate(msgs):
        if m.get("content") is None:
            m = {**m, "content": ""}
        calls = m.get("tool_calls")
        if calls and any(isinstance(c["function"].get("arguments"), str) for c in calls) and \
                (object_args if object_args is not None else (object_args := _reads_arguments_as_mapping(text))):
            new_calls = []
            for j, c in enumerate(calls):
                args = c["function"].get("arguments")
                if isinstance(args, str):
                    try:
                        args = json.loads(args)
                    except ValueError as exc:
                        raise ChatTemplateError(
                            f"message {i} ({m['role']}) tool_calls[{j}].function.arguments is not JSON text ({exc}: "
                            f"{args!r:.60}); chat template {source} reads the arguments as an object") from None
                    if not isinstance(args, dict):
                        raise ChatTemplateError(
                            f"message {i} ({m['role']}) tool_calls[{j}].function.arguments is JSON {type(args).__name__} "
                            f"({c['function']['arguments']!r:.60}); chat template {source} reads the arguments as "
                            "an object, expected a JSON object")
                new_calls.append({**c, "function": {**c["function"], "arguments": args}})
            m = {**m, "tool_calls": new_calls}
        out.append(m)
    return out


def _marker(i: int) -> str:
    # Letters only: the built-in formats trim whitespace around a message's text, nothing else.
    return f"PyllmProbe{i}Q"


def _apply_builtin(name: str, turns: Sequence[tuple[str, str]], add_assistant: bool) -> str:
    """llama.cpp's built-in format ``name`` applied to (role, text) pairs (neither may hold a NUL)."""
    keep = []
    arr = ffi.new("llama_chat_message[]", len(turns))
    total = 0
    for i, (role, text) in enumerate(turns):
        r = ffi.new("char[]", role.encode("utf-8", "replace"))
        c = ffi.new("char[]", text.encode("utf-8", "replace"))
        keep += (r, c)
        arr[i].role, arr[i].content = r, c
        total += len(r) + len(c)
    tmpl_c = name.encode()
    size = max(256, 2 * total + 256)
    while True:
        buf = ffi.new("char[]", size)
        n = lib.llama_chat_apply_template(tmpl_c, arr, len(turns), add_assistant, buf, size)
        if n < 0:
            raise ChatTemplateError(f"llama.cpp's built-in chat templates do not recognise {name!r}")
        if n <= size:
            return ffi.unpack(buf, n).decode("utf-8", "replace")
        size = n + 1


def _render(tmpl, variables: dict, source: str, seconds: float, max_chars: int) -> str:
    from jinja2 import TemplateError
    from jinja2.exceptions import SecurityError

    budget = _Budget(seconds, max_chars)
    outer, _local.budget = _budget(), budget
    parts: list[str] = []
    total = 0
    try:
        for chunk in tmpl.generate(**variables):
            total += len(chunk)
            budget.size(total)
            budget.tick()
            parts.append(chunk)
    except _TemplateRaised as exc:  # the template refuses this conversation: the messages are at fault
        raise ChatTemplateError(f"chat template {source} raised an error: {exc}") from None
    # Everything else is the template's own failure, whatever the messages were.
    except _Limit as exc:
        raise BrokenChatTemplateError(f"chat template {source} was stopped: {exc}") from None
    except SecurityError as exc:
        raise BrokenChatTemplateError(f"chat template {source} did something the sandbox forbids: {exc}") from None
    except TemplateError as exc:
        raise BrokenChatTemplateError(f"chat template {source} failed: {exc}") from None
    except RecursionError:
        raise BrokenChatTemplateError(f"chat template {source} failed: recursion too deep") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError, OverflowError) as exc:
        raise BrokenChatTemplateError(f"chat template {source} failed: {type(exc).__name__}: {exc}") from None
    finally:
        _local.budget = outer
    return "".join(parts)


def _looks_like_template_text(spec: str) -> bool:
    return "{%" in spec or "{{" in spec or "\n" in spec


def _read_template_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ChatTemplateError(f"chat template file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise ChatTemplateError(f"chat template file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ChatTemplateError(f"cannot read chat template file {path}: {exc.strerror or exc}") from None


def _special_text(model: Any, token: int) -> str:
    if token is None or token < 0:
        return ""
    try:
        return model.token_to_piece(token, special=True).decode("utf-8", "replace")
    except Exception:  # a vocabulary without that token: the template gets ""
        return ""


# A GGUF without tokenizer.chat_template (the default Gemma 3 270M is one): the format its family documents.
_ARCH_FALLBACK = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma"}


def _is_glm(text: Optional[str]) -> bool:
    return bool(text) and "[gMASK]" in text and "<|assistant|>" in text


def resolve_template(spec: Optional[str] = None, model: Any = None) -> ChatTemplate:
    """The template that ``spec`` names (see the module docstring); ``model`` supplies its own template,
    ``bos_token`` and ``eos_token``. Raises ChatTemplateError for an unknown name (with close matches),
    a missing file or a model without a template."""
    model_name = model.path.name if model is not None and getattr(model, "path", None) is not None else "the model"
    own = model.chat_template() if model is not None else None
    if spec is not None and not isinstance(spec, str):
        raise ChatTemplateError(f"chat template {spec!r} is a {type(spec).__name__}; expected a name, a path to a "
                                ".jinja file or template text")
    spec = spec.strip() if spec is not None and not _looks_like_template_text(spec) else spec
    if not spec and own is None and model is not None:
        arch = getattr(model, "architecture", "") or ""
        fallback = _ARCH_FALLBACK.get(arch)
        if fallback is not None:
            logger.info("%s has no tokenizer.chat_template; using llama.cpp's built-in %r for architecture %s",
                        model_name, fallback, arch)
            tmpl = ChatTemplate(source=f"llama.cpp built-in {fallback!r} ({model_name} has no tokenizer.chat_template; "
                                       f"chosen for its architecture {arch})", builtin=fallback)
            tmpl.bos_token = _special_text(model, model.bos)
            tmpl.eos_token = _special_text(model, model.eos)
            return tmpl
    if not spec:
        if own is None:
            raise ChatTemplateError(
                f"model {model_name} has no chat template (no tokenizer.chat_template in the GGUF); pass a template "
                "name, a .jinja path or template text (MODEL_CHAT_TEMPLATE / --chat-template; "
                "`pyllm info --chat-templates` lists the names)" if model is not None else
                "no chat template given and no model to take one from")
        tmpl = ChatTemplate(source=f"tokenizer.chat_template of {model_name}", text=own)
    elif _looks_like_template_text(spec):
        tmpl = ChatTemplate(source="template text", text=spec)
    elif spec.lower() == GLM4_NAME:
        if _is_glm(own):
            tmpl = ChatTemplate(source=f"glm4 (tokenizer.chat_template of {model_name})", text=own)
        else:
            path = shipped_templates().get(GLM4_FALLBACK)
            if path is None:
                raise ChatTemplateError(f"chat template glm4: {GLM4_FALLBACK}.jinja is not installed "
                                        "(no pyllm/templates nor vendor/llama.cpp/models/templates)")
            tmpl = ChatTemplate(source=f"glm4 ({path.name})", text=_read_template_file(path))
    elif spec.endswith(".jinja") or os.sep in spec or (os.altsep and os.altsep in spec):
        path = Path(spec).expanduser()
        tmpl = ChatTemplate(source=str(path), text=_read_template_file(path))
    else:
        shipped = shipped_templates()
        lower = {k.lower(): k for k in shipped}
        builtins = builtin_templates()
        if spec.lower() in lower:
            path = shipped[lower[spec.lower()]]
            tmpl = ChatTemplate(source=path.name, text=_read_template_file(path))
        elif spec in builtins:
            tmpl = ChatTemplate(source=f"llama.cpp built-in {spec!r}", builtin=spec)
        else:
            names = [GLM4_NAME] + list(shipped) + builtins
            close = difflib.get_close_matches(spec, names, n=5, cutoff=0.5)
            close += [n for n in names if spec.lower() in n.lower() and n not in close][: 5 - len(close)]
            hint = f"did you mean: {', '.join(close)}? " if close else ""
            raise ChatTemplateError(f"unknown chat template {spec!r}; {hint}(`pyllm info --chat-templates` lists "
                                    f"all {len(names)} names; a path to a .jinja file or template text also works)")
    if model is not None:
        tmpl.bos_token = _special_text(model, model.bos)
        tmpl.eos_token = _special_text(model, model.eos)
    return tmpl


# ---------------------------------------------------------------------------------------------------
# prompt tokens: only the template's own markup becomes control tokens
# ---------------------------------------------------------------------------------------------------
_ASCII_SPACE = " \t\n\v\f\r"   # C isspace() in the "C" locale, as llama.cpp's lstrip/rstrip use it


class ControlTokens:
    """The vocabulary's control tokens (llama.cpp's CONTROL and UNKNOWN attributes): the tokens that only
    ``llama_tokenize(..., parse_special=true)`` makes out of text, such as ``<start_of_turn>``.

    ``table``: token text -> (token id, llama_token_attr bits). :meth:`partition` splits a text at
    their occurrences exactly as llama.cpp's tokenizer does (``tokenizer_st_partition``: longest text
    first, then leftmost; lstrip/rstrip attributes drop the whitespace beside them); :meth:`spans`
    finds them in untrusted text so that it can be kept apart from the template's markup.
    """

    def __init__(self, table: dict[str, tuple[int, int]], lstrip: int, rstrip: int) -> None:
        self.table = table
        self.lstrip, self.rstrip = lstrip, rstrip
        self.lengths = sorted({len(t) for t in table}, reverse=True)
        firsts = sorted({t[0] for t in table})
        self._first = re.compile("[" + "".join(re.escape(c) for c in firsts) + "]") if firsts else None
        # Proper prefixes/suffixes: a text that ends (starts) with one could complete a control token
        # together with whatever the template writes next to it.
        self._prefixes = {t[:i] for t in table for i in range(1, len(t))}
        self._suffixes = {t[i:] for t in table for i in range(1, len(t))}

    def __bool__(self) -> bool:
        return bool(self.table)

    def _occurrences(self, text: str) -> list[tuple[int, int]]:
        """(start, length) of every occurrence of a control token's text, overlapping ones included."""
        if self._first is None:
            return []
        table, lengths = self.table, self.lengths
        out = []
        for m in self._first.finditer(text):
            p = m.start()
            for n in lengths:
                if text[p:p + n] in table:
                    out.append((p, n))
        return out

    def _select(self, text: str) -> list[tuple[int, int]]:
        """The occurrences llama.cpp turns into tokens: longest first, then leftmost, never overlapping."""
        occ = sorted(self._occurrences(text), key=lambda o: (-o[1], o[0]))
        taken = bytearray(len(text))
        chosen = []
        for p, n in occ:
            if not any(taken[p:p + n]):
                taken[p:p + n] = b"\x01" * n
                chosen.append((p, n))
        chosen.sort()
        return chosen

    def partition(self, text: str) -> list[Union[str, int]]:
        """``text`` as llama.cpp's parse_special partition sees it: raw text pieces (str) and control token ids."""
        out: list[Union[str, int]] = []
        pos, strip_next = 0, False
        for p, n in self._select(text):
            piece = text[pos:p]
            if strip_next:
                piece = piece.lstrip(_ASCII_SPACE)
            tid, attr = self.table[text[p:p + n]]
            if attr & self.lstrip:
                piece = piece.rstrip(_ASCII_SPACE)
            if piece:
                out.append(piece)
            out.append(tid)
            strip_next = bool(attr & self.rstrip)
            pos = p + n
        piece = text[pos:].lstrip(_ASCII_SPACE) if strip_next else text[pos:]
        if piece:
            out.append(piece)
        return out

    def spans(self, text: str) -> list[tuple[int, int]]:
        """(start, end) ranges of ``text`` to keep apart from the template: every control token text in it,
        and a start (end) that could complete one together with the text before (after) it. Merged."""
        ranges = [(p, p + n) for p, n in self._occurrences(text)]
        if self.table and text:
            longest = self.lengths[0]
            for n in range(min(longest - 1, len(text)), 0, -1):
                if text[:n] in self._suffixes:
                    ranges.append((0, n))
                    break
            for n in range(min(longest - 1, len(text)), 0, -1):
                if text[-n:] in self._prefixes:
                    ranges.append((len(text) - n, len(text)))
                    break
        ranges.sort()
        merged: list[tuple[int, int]] = []
        for a, b in ranges:
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
            else:
                merged.append((a, b))
        return merged


class _Placeholders:
    """Stand-ins for control-token text found in messages while the template renders: plain ASCII
    letters and digits (``tojson``, ``trim`` and ``replace`` leave them alone), unique to one render."""

    def __init__(self) -> None:
        self.nonce = secrets.token_hex(8)
        self.originals: list[str] = []
        self._pattern = re.compile(f"PYLLM{self.nonce}Q([0-9]+)Z")

    def hide(self, text: str, controls: ControlTokens) -> str:
        spans = controls.spans(text)
        if not spans:
            return text
        out, pos = [], 0
        for a, b in spans:
            out.append(text[pos:a])
            out.append(f"PYLLM{self.nonce}Q{len(self.originals)}Z")
            self.originals.append(text[a:b])
            pos = b
        out.append(text[pos:])
        return "".join(out)

    def hide_all(self, value: Any, controls: ControlTokens) -> Any:
        """A copy of ``value`` (str, dict, list, tuple and scalars, nested) with every str hidden, keys included."""
        if isinstance(value, str):
            return self.hide(value, controls)
        if isinstance(value, dict):
            return {self.hide_all(k, controls): self.hide_all(v, controls) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.hide_all(v, controls) for v in value)
        return value

    def restore(self, text: str) -> str:
        return self._pattern.sub(lambda m: self.originals[int(m.group(1))], text) if self.originals else text

    def check_intact(self, text: str, source: str) -> None:
        """A template that cut or re-cased a stand-in would leave text that is neither the message's nor
        safe to parse: refuse it."""
        if self.originals and len(re.findall(f"pyllm{self.nonce[:6]}", text, re.IGNORECASE)) != \
                len(self._pattern.findall(text)):
            raise ChatTemplateError(f"chat template {source} altered message text that contains special-token "
                                    "text (cut or changed its case); such a message cannot be rendered safely")


@dataclass
class ChatPrompt:
    """A rendered conversation. ``text``: the prompt as Hugging Face's ``apply_chat_template`` renders it;
    ``tokens``: its token ids, in which only the template's own markup became control tokens (text that
    came from the messages, tools or template arguments is tokenized as plain text); ``generation_prompt``:
    what ``add_generation_prompt`` appended (the template's own text, e.g. ``<start_of_turn>model\n``)."""

    text: str
    tokens: list[int]
    generation_prompt: str = ""


def render_safely(render: Callable[[Any, Any, dict], tuple[str, str, Any]], model: Any, messages: Any, tools: Any,
                  template_kwargs: dict, *, special_in_messages: bool = False, source: str = "template") -> tuple[ChatPrompt, Any]:
    """Render a conversation and tokenize it so that only the template's own markup becomes control tokens
    (see :meth:`ChatTemplate.render_prompt`): ``render(messages, tools, template_kwargs)`` returns (the prompt
    text, the generation prompt, anything else) for the values it is given, in which control-token text
    from the caller has been replaced by stand-ins; returns (the ChatPrompt, that anything else). Any
    renderer works this way: pyllm's Jinja sandbox, or llama.cpp's (pyllm.chat_common)."""
    controls = model.control_tokens()
    if special_in_messages or not controls:
        hide = restore = lambda v: v  # noqa: E731
        ph = None
    else:
        ph = _Placeholders()
        hide = lambda v: ph.hide_all(v, controls)  # noqa: E731
        restore = ph.restore
    msgs = hide(list(messages)) if isinstance(messages, (list, tuple)) else messages
    text, generation_prompt, extra = render(msgs, hide(tools), hide(template_kwargs))
    if ph is not None:
        ph.check_intact(text, source)
    pieces = [restore(p) if isinstance(p, str) else p for p in controls.partition(text)] if controls else [text]
    if pieces and pieces[0] == model.bos and model.add_bos:
        pieces = pieces[1:]  # the template wrote the BOS llama.cpp adds: one BOS (Model.tokenize_prompt's rule)
    return ChatPrompt(restore(text), tokenize_prompt(model, pieces, add_special=True), restore(generation_prompt)), extra


def tokenize_prompt(model: Any, pieces: Sequence[Union[str, int]], *, add_special: bool) -> list[int]:
    """Ids of a partitioned prompt (see :meth:`ControlTokens.partition`): each raw piece tokenized as plain
    text, control tokens as they are; ``add_special`` adds what llama.cpp adds around a text (BOS, EOS ...)."""
    out: list[int] = []
    for piece in pieces:
        out.extend(model.tokenize(piece, add_special=False, parse_special=False) if isinstance(piece, str) else (piece,))
    if add_special:
        before, after = model.special_frame()
        return list(before) + out + list(after)
    return out


# ---------------------------------------------------------------------------------------------------
# reasoning
# ---------------------------------------------------------------------------------------------------
REASONING = "reasoning"
CONTENT = "content"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningParser:
    """Splits streamed model output into ``("reasoning", text)`` and ``("content", text)`` pieces.

    A reasoning block is ``start ... end`` at the beginning of the reply (leading whitespace allowed);
    with ``starts_in_reasoning`` the prompt already opened it (GLM-4.7-Flash's and DeepSeek-R1's
    generation prompts end with ``<think>``). Tags split across pieces are recognised; the tags
    themselves and the whitespace right after a tag are not emitted.
    """

    def __init__(self, start: str = "<think>", end: str = "</think>", starts_in_reasoning: bool = False) -> None:
        if not start or not end:
            raise ValueError("reasoning start and end tags must be non-empty strings")
        self.start, self.end = start, end
        self._in_reasoning = starts_in_reasoning
        self._may_start = not starts_in_reasoning   # a start tag counts only before any content
        self._after_tag = starts_in_reasoning        # drop whitespace right after a tag
        self._buf = ""

    @property
    def in_reasoning(self) -> bool:
        return self._in_reasoning

    def _emit(self, out: list, kind: str, text: str) -> None:
        if self._after_tag:
            text = text.lstrip()
            if not text:
                return
            self._after_tag = False
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))

    def feed(self, text: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        buf = self._buf + text
        while buf:
            if self._in_reasoning:
                i = buf.find(self.end)
                if i >= 0:
                    self._emit(out, REASONING, buf[:i])
                    buf = buf[i + len(self.end):]
                    self._in_reasoning = False
                    self._after_tag = True
                    continue
                hold = _partial_suffix(buf, self.end)
                self._emit(out, REASONING, buf[: len(buf) - hold])
                buf = buf[len(buf) - hold:]
                break
            if self._may_start:
                stripped = buf.lstrip()
                if not stripped:
                    break                                  # only whitespace so far: wait
                if stripped.startswith(self.start):
                    buf = stripped[len(self.start):]
                    self._in_reasoning, self._may_start, self._after_tag = True, False, True
                    continue
                if self.start.startswith(stripped):
                    break                                  # could still become the start tag
                self._may_start = False
            self._emit(out, CONTENT, buf)
            buf = ""
        self._buf = buf
        return out

    def finish(self) -> list[tuple[str, str]]:
        """Flush what is held back (a partial tag at the very end is text after all)."""
        out: list[tuple[str, str]] = []
        if self._buf:
            self._emit(out, REASONING if self._in_reasoning else CONTENT, self._buf)
            self._buf = ""
        return out


def split_reasoning(text: str, start: str = "<think>", end: str = "</think>",
                    starts_in_reasoning: bool = False) -> tuple[str, str]:
    """``(reasoning, content)`` of a whole reply; both stripped of surrounding whitespace."""
    p = ReasoningParser(start, end, starts_in_reasoning)
    pieces = p.feed(text) + p.finish()
    reasoning = "".join(t for k, t in pieces if k == REASONING)
    content = "".join(t for k, t in pieces if k == CONTENT)
    return reasoning.strip(), content.strip()


def reasoning_parser_for(prompt: Union[str, ChatPrompt], template: Optional[ChatTemplate] = None) -> Optional[ReasoningParser]:
    """A parser when the template uses ``<think>`` tags, else None. Decided from the template alone (its
    text, and the generation prompt it appended), never from message text: a conversation that quotes
    ``<think>`` does not turn the split on.

    It starts inside the reasoning block when the generation prompt ends with an open ``<think>``
    (GLM-4.7-Flash, DeepSeek-R1); with thinking turned off those templates close the block there
    (``</think>``) and the reply is content. ``prompt``: a ChatPrompt (from render_prompt), or the
    rendered text, whose end is then taken as the template's generation prompt.
    """
    start, end = "<think>", "</think>"
    source = template.text if template is not None and template.text else ""
    if isinstance(prompt, ChatPrompt):
        generation = prompt.generation_prompt
    else:
        generation = prompt[-64:] if prompt.rstrip().endswith(start) else ""
    if end not in source and start not in generation:
        return None
    return ReasoningParser(start, end, starts_in_reasoning=generation.rstrip().endswith(start))


# ---------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------
@dataclass
class ChatResult:
    """One chat reply: ``text`` as generated, split into ``reasoning_content`` and ``content``;
    ``result`` is the engine's GenerationResult (its fields are readable here too: ``stop_reason``,
    ``tokens``, ``n_prompt``, ``gen_tps`` ...); ``prompt`` is the rendered prompt text."""

    text: str
    content: str
    reasoning_content: str
    result: Any
    prompt: str = ""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "result":
            raise AttributeError(name)
        return getattr(self.result, name)

    def message(self) -> dict:
        """The reply as an assistant message for the next turn."""
        m = {"role": "assistant", "content": self.content}
        if self.reasoning_content:
            m["reasoning_content"] = self.reasoning_content
        return m


def join_pieces(pieces: Iterable[tuple[str, str]]) -> tuple[str, str]:
    """(reasoning, content) of streamed pieces, stripped."""
    r, c = [], []
    for kind, text in pieces:
        (r if kind == REASONING else c).append(text)
    return "".join(r).strip(), "".join(c).strip()


__all__ = [
    "CONTENT", "ChatPrompt", "ChatResult", "ChatTemplate", "ControlTokens", "REASONING", "ReasoningParser",
    "available_templates", "builtin_templates", "join_pieces", "reasoning_parser_for", "resolve_template", "shipped_templates",
    "split_reasoning", "templates_dir", "tokenize_prompt", "validate_messages",
]


