"""Anthropic's Messages API: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

The request is translated to a chat request (pyllm.server.anthropic) and goes through the shared request
path (``Serving.start_chat``: template, tools, constraints, sampling, limits), so it is served by the same
engine exactly as a chat completion is; the reply comes back in Anthropic's shape, whole or as its
server-sent events (``message_start`` ... ``message_stop``). Every error, those of the chat path included,
is answered in Anthropic's shape (``{"type": "error", "error": {"type", "message"}}``).
"""
from __future__ import annotations

import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pyllm.server.anthropic import (AnthropicError, AnthropicStream, anthropic_to_chat, chat_to_anthropic,
                                    count_tokens_response, count_tokens_to_chat, from_openai_error)
from pyllm.server.chat_completions import finish_reason
from pyllm.server.errors import APIError
from pyllm.server.fields import FieldError
from pyllm.server.http import EventStream
from pyllm.server.schemas import ChatCompletionRequest
from pyllm.server.serving import Serving

log = logging.getLogger("pyllm.server")


def _response(err: AnthropicError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def anthropic_error(exc: BaseException) -> AnthropicError:
    """Any error of the request path in Anthropic's shape."""
    if isinstance(exc, AnthropicError):
        return exc
    if isinstance(exc, APIError):
        return from_openai_error(exc.status if exc.status != 499 else 400, exc.message, exc.param, headers=exc.headers)
    if isinstance(exc, FieldError):
        return from_openai_error(400, exc.message, exc.param or None)
    log.exception("unexpected error answering /v1/messages")
    return AnthropicError(500, f"internal error: {type(exc).__name__}: {exc}")


def register(app: FastAPI, h: Serving) -> None:
    def chat_body(chat: dict):
        return h.validate(ChatCompletionRequest, json.dumps(chat, ensure_ascii=False).encode("utf-8"))

    @app.post("/v1/messages")
    async def messages(request: Request):
        t0 = time.perf_counter()
        try:
            body = chat_body(anthropic_to_chat(await h.read_json(request)))
            c = await h.start_chat(body)
        except Exception as exc:   # noqa: BLE001 - every failure is answered in Anthropic's shape
            return _response(anthropic_error(exc))
        req = c.req

        def stop_sequence(result):
            return result.stop_word if result.stop_reason == "stop" else None

        if body.stream:
            stream = AnthropicStream(model=c.name, n_prompt=len(c.tokens), n_cached=0)

            async def events():
                reply = c.reply()
                first = True
                try:
                    async for piece in req:
                        if first:
                            first = False
                            h.metrics.ttft.observe(time.perf_counter() - t0)
                            for ev in stream.start(n_prompt=len(c.tokens), n_cached=req.n_prompt_cached):
                                yield ev
                        for delta in reply.feed(piece):
                            for ev in stream.feed(delta):
                                yield ev
                    result = req.result
                    for ev in stream.start(n_prompt=result.n_prompt, n_cached=result.n_prompt_cached):
                        yield ev
                    for delta in reply.finish():
                        for ev in stream.feed(delta):
                            yield ev
                    h.record(result, t0, req)
                    err = h.failure(result)
                    if err is not None:
                        for ev in stream.error(anthropic_error(err)):
                            yield ev
                        return
                    for ev in stream.finish(finish_reason(result, reply), n_decoded=len(result.tokens),
                                            stop_sequence=stop_sequence(result)):
                        yield ev
                except Exception as exc:   # noqa: BLE001 - the stream has begun: an error event ends it
                    if not stream.done:
                        for ev in stream.error(anthropic_error(exc)):
                            yield ev

            return EventStream(events(), req, h.metrics.cancelled.inc)

        try:
            result = await h.finished(request, req, t0)
            message = c.reply().message(result.text)
            choice = {"message": message, "finish_reason": finish_reason(result, message)}
            return chat_to_anthropic(choice, model=c.name, n_prompt=result.n_prompt, n_cached=result.n_prompt_cached,
                                     n_decoded=len(result.tokens), stop_sequence=stop_sequence(result))
        except Exception as exc:   # noqa: BLE001
            return _response(anthropic_error(exc))

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        try:
            body = chat_body(count_tokens_to_chat(await h.read_json(request)))
            c = await h.prepare_chat(body)
            return count_tokens_response(len(c.tokens))
        except Exception as exc:   # noqa: BLE001
            return _response(anthropic_error(exc))
