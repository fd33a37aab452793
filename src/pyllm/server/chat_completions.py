"""OpenAI's chat completions (``POST /v1/chat/completions``, also ``/chat/completions``): the request goes
through the shared path (``Serving.start_chat``: template, tokens, sampling, tools and constraints, ``n``
choices), and each choice's text through its Reply (pyllm.server.replies) into ``content``,
``reasoning_content`` and ``tool_calls``; streamed as OpenAI's ``chat.completion.chunk`` deltas (a tool
call's ``id`` and ``name`` first, its ``arguments`` in pieces). ``finish_reason`` is ``tool_calls`` when a
choice ends with calls, as llama-server reports it.
"""
from __future__ import annotations

import time
import uuid
from typing import Optional

from fastapi import FastAPI, Request

from pyllm.server.http import EventStream, sse
from pyllm.server.native import timings_of
from pyllm.server.schemas import ChatCompletionRequest
from pyllm.server.serving import FINISH, Serving
from pyllm.server.shapes import LogprobCursor, chat_logprob_content


def finish_reason(result, message_or_reply) -> str:
    """OpenAI's finish_reason: ``tool_calls`` for a reply that ended on its own with tool calls."""
    reason = FINISH[result.stop_reason]
    calls = (message_or_reply.get("tool_calls") if isinstance(message_or_reply, dict)
             else message_or_reply.has_tool_calls)
    return "tool_calls" if calls and reason == "stop" else reason


def register(app: FastAPI, h: Serving) -> None:
    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        body = await h.parse(request, ChatCompletionRequest, h.max_body_bytes)
        n = h.check_n(h.engine_or_503(), body.n)
        c = await h.start_chat(body, n=n, honoured=frozenset({"timings_per_token"}))
        eng, name, reqs, n_logprobs = c.eng, c.name, c.reqs, c.n_logprobs
        cid, created_at = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(i: int, delta: dict, finish: Optional[str] = None, entries=None) -> dict:
            lp = {"content": chat_logprob_content(entries)} if entries is not None else None
            return {"id": cid, "object": "chat.completion.chunk", "created": created_at, "model": name,
                    "system_fingerprint": h.fingerprint,
                    "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

        if body.stream:
            replies = [c.reply() for _ in reqs]
            timings_per_token = bool(getattr(body, "timings_per_token", False))
            cursors = [LogprobCursor(r) if n_logprobs is not None else None for r in reqs]

            def events_of(i: int, piece: str) -> list[str]:
                cursor = cursors[i]
                if cursor:
                    cursor.on_piece()
                out = [chunk(i, delta, entries=cursor.take() if cursor else None) for delta in replies[i].feed(piece)]
                if timings_per_token:   # llama-server's: each chunk carries the request's timings so far
                    for ev in out:
                        ev["timings"] = timings_of(reqs[i].progress())
                return [sse(ev) for ev in out]

            events = h.stream_choices(
                reqs, t0, include_usage=bool(body.stream_options and body.stream_options.include_usage),
                # content null in the first chunk, as llama-server sends it (the role alone)
                start=lambda i: [sse(chunk(i, {"role": "assistant", "content": None}))],
                events_of=events_of,
                flush=lambda i: [sse(chunk(i, delta)) for delta in replies[i].finish()],
                finish_event=lambda i, result: chunk(i, {}, finish_reason(result, replies[i]),
                                                     entries=(cursors[i].rest() or None) if cursors[i] else None),
                usage_event=lambda results: {"id": cid, "object": "chat.completion.chunk", "created": created_at,
                                             "model": name, "system_fingerprint": h.fingerprint, "choices": [],
                                             "usage": h.merged_usage(results), "timings": timings_of(results[0])})
            # The client going away (or shutdown's grace running out) cancels the choices: KV cells freed.
            return EventStream(events, reqs, h.metrics.cancelled.inc)

        results = await h.finished_all(request, reqs, t0)
        choices = []
        for i, (req, result) in enumerate(zip(reqs, results)):
            message = c.reply().message(result.text)
            lp = {"content": chat_logprob_content(req.logprobs)} if n_logprobs is not None else None
            choices.append({"index": i, "message": message, "logprobs": lp,
                            "finish_reason": finish_reason(result, message)})
        out = {"id": cid, "object": "chat.completion", "created": created_at, "model": name,
               "system_fingerprint": h.fingerprint, "choices": choices,
               "usage": h.merged_usage(results), "timings": timings_of(results[0])}
        if body.verbose or h.verbose:
            out["__verbose"] = h.verbose_of(eng, reqs[0], results[0], c.tokens, name, body, c.stops, c.requested,
                                            c.capped)
        return out
