"""A reply's text turned into what the APIs send: ``content``, ``reasoning_content`` and ``tool_calls``,
whole (:meth:`Reply.message`) or as streamed deltas (:meth:`Reply.feed` and :meth:`Reply.finish`).

Three kinds, chosen per request by the shared request path (pyllm.server.serving):

- :class:`PlainReply`: the text is the content.
- :class:`ReasoningReply`: the ``<think>`` split of pyllm.chat (templates that use ``<think>`` tags).
- :class:`CommonReply`: llama.cpp's own parser for the template (``pyllm.chat_common.ChatParser``, what
  llama-server runs): tool calls, reasoning and content for every format llama.cpp knows. Used for
  requests with tools or a constraint (json_schema, grammar), where the template's own tool-call syntax
  and reasoning block must be read back exactly as llama-server reads them.

Deltas are OpenAI chat-completion ``delta`` dicts: ``{"content": text}``, ``{"reasoning_content": text}``
or ``{"tool_calls": [{"index", "id", "type", "function": {"name", "arguments"}}]}`` (a call's ``id`` and
``name`` in its first delta, its ``arguments`` in pieces after).
"""
from __future__ import annotations

import logging
from typing import Optional

from pyllm.chat import ReasoningParser
from pyllm.chat_common import ChatParser, MessageDelta, ParsedMessage
from pyllm.errors import ToolCallParseError

log = logging.getLogger("pyllm.server")

__all__ = ["Reply", "PlainReply", "ReasoningReply", "CommonReply"]


class Reply:
    """Base: the whole reply as the content."""

    has_tool_calls = False

    def feed(self, piece: str) -> list[dict]:
        """The deltas a new piece of text gives (maybe none, while a tag is still ambiguous)."""
        return [{"content": piece}] if piece else []

    def finish(self) -> list[dict]:
        """The deltas held back until the reply ended."""
        return []

    def message(self, text: str) -> dict:
        """The whole reply ``text`` as an OpenAI ``message`` (role, content, reasoning_content, tool_calls)."""
        return {"role": "assistant", "content": text}


class PlainReply(Reply):
    pass


class ReasoningReply(Reply):
    """pyllm.chat's ``<think>`` split (a ReasoningParser: ``feed``/``finish`` give (kind, text) parts)."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.parser = parser

    @staticmethod
    def _deltas(parts) -> list[dict]:
        return [{"reasoning_content" if kind == "reasoning" else "content": text} for kind, text in parts if text]

    def feed(self, piece: str) -> list[dict]:
        return self._deltas(self.parser.feed(piece))

    def finish(self) -> list[dict]:
        return self._deltas(self.parser.finish())

    def message(self, text: str) -> dict:
        parts = self.parser.feed(text) + self.parser.finish()
        reasoning = "".join(t for k, t in parts if k == "reasoning")
        out = {"role": "assistant", "content": "".join(t for k, t in parts if k != "reasoning")}
        if reasoning:
            out["reasoning_content"] = reasoning
        return out


def _openai_deltas(diffs: list[MessageDelta]) -> list[dict]:
    out: list[dict] = []
    for d in diffs:
        if d.reasoning_content_delta:
            out.append({"reasoning_content": d.reasoning_content_delta})
        if d.content_delta:
            out.append({"content": d.content_delta})
        if d.tool_call_index is not None and d.tool_call is not None:
            call: dict = {"index": d.tool_call_index}
            fn: dict = {}
            if d.tool_call.id:
                call["id"] = d.tool_call.id
                call["type"] = "function"
            if d.tool_call.name:
                fn["name"] = d.tool_call.name
            fn["arguments"] = d.tool_call.arguments
            call["function"] = fn
            out.append({"tool_calls": [call]})
    return out


class CommonReply(Reply):
    """llama.cpp's parser for the request's template and tools (``ChatParams.make_parser()``). Streaming
    follows llama-server's ``update_chat_msg``: the text so far is parsed as partial after each piece, the
    differences go out as deltas, and the last parse is complete. A reply that does not parse as the
    format when complete (markup the template's grammar allowed but its parser refuses, a call cut short)
    keeps its reasoning and comes back whole as ``content``, without tool calls, and the failure is
    logged (llama-server answers an error there; the text is the client's to judge)."""

    def __init__(self, parser: ChatParser) -> None:
        self.parser = parser
        self.final: Optional[ParsedMessage] = None
        self.text = ""
        self.sent_content = ""

    @property
    def has_tool_calls(self) -> bool:  # type: ignore[override]
        return bool(self.final is not None and self.final.tool_calls)

    def _track(self, deltas: list[dict]) -> list[dict]:
        self.sent_content += "".join(d.get("content", "") for d in deltas)
        return deltas

    def feed(self, piece: str) -> list[dict]:
        if not piece:
            return []
        self.text += piece
        try:
            _msg, diffs = self.parser.update(piece, is_partial=True)
        except ToolCallParseError as exc:   # partial parses do not fail in llama.cpp; keep the text if one does
            log.warning("partial reply did not parse: %s", exc)
            return []
        return self._track(_openai_deltas(diffs))

    def finish(self) -> list[dict]:
        try:
            msg, diffs = self.parser.update("", is_partial=False)
        except ToolCallParseError as exc:
            log.warning("the reply does not parse as %s when complete; it is returned as content: %s",
                        self.parser.format, exc)
            partial, _ = self.parser.update("", is_partial=True)
            self.final = ParsedMessage(content=self.text, reasoning_content=partial.reasoning_content)
            rest = self.text[len(self.sent_content):] if self.text.startswith(self.sent_content) else self.text
            return self._track([{"content": rest}] if rest else [])
        self.final = msg
        return self._track(_openai_deltas(diffs))

    def message(self, text: str) -> dict:
        self.feed(text)
        self.finish()
        assert self.final is not None
        return self.final.to_openai()
