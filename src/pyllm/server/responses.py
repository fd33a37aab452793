"""OpenAI's Responses API (``POST /v1/responses``, also ``/responses``), as llama-server serves it: the
request is turned into a chat request (``server_chat_convert_responses_to_chatcmpl`` in llama-server's
``server-chat.cpp``) and goes through the chat path (``create_app``'s ``start_chat``), so the template,
limits, sampling and refusals are the chat endpoint's. The answer is a ``response`` object with one
``message`` output item (and a ``reasoning`` item before it when the template splits one off), or, with
``stream``, OpenAI's typed events (``response.created`` ... ``response.output_text.delta`` ...
``response.completed``).

Accepted input: ``input`` as text or a list of messages (``role`` user/system/developer/assistant,
``content`` as text or ``input_text``/``output_text`` parts), ``instructions`` (a system message first),
``max_output_tokens``, ``temperature``, ``top_p``, ``stream``, ``reasoning.effort`` (the template's
reasoning_effort). Refused with a 400 naming the field: ``previous_response_id`` (no stored
conversations), images and files, function-call items, ``tools``, a forced ``tool_choice``, ``text.format``
other than text. Bookkeeping fields (``store``, ``metadata``, ``user``, ``truncation``, ``include``,
``parallel_tool_calls``, ``service_tier``) change nothing here.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request

from pyllm.server.fields import FieldError
from pyllm.server.native import prompt_progress_of, timings_of
from pyllm.server.schemas import ChatCompletionRequest

# Fields of a responses request passed to the chat request as they are.
_SAME = ("model", "temperature", "top_p", "stream", "stop", "seed", "top_k", "min_p", "repeat_penalty", "typical_p",
         "logit_bias", "cache_prompt", "ignore_eos", "verbose", "reasoning_format", "chat_template_kwargs", "n_predict")
_IGNORED = ("store", "metadata", "user", "truncation", "include", "parallel_tool_calls", "service_tier",
            "background", "safety_identifier", "prompt_cache_key")
_MESSAGE_ROLES = ("user", "system", "developer", "assistant")
# llama-server's streaming telemetry, served by the stream itself (not part of the chat request)
_TELEMETRY = ("timings_per_token", "return_progress")


def telemetry_of(body: dict) -> tuple[bool, bool]:
    """(timings_per_token, return_progress) of a responses request: booleans (FieldError otherwise)."""
    out = []
    for name in _TELEMETRY:
        value = body.get(name, False)
        if not isinstance(value, bool):
            raise FieldError(f"{name}={value!r}; expected true or false", name)
        out.append(value)
    return out[0], out[1]


def _text_of_parts(parts: Any, where: str) -> str:
    if isinstance(parts, str):
        return parts
    if not isinstance(parts, list):
        raise FieldError(f"{where} is a {type(parts).__name__}; expected text or a list of content parts", "input")
    out = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif kind in ("input_image", "input_file", "input_audio"):
            raise FieldError(f"{where}[{j}] is {kind!r}: this server takes text only", "input")
        else:
            raise FieldError(f"{where}[{j}]: expected an input_text or output_text part with 'text', got "
                             f"{json.dumps(part)[:80]}", "input")
    return "".join(out)


def to_chat(body: Any) -> dict:
    """The chat completions request (a dict) that a responses request asks for; FieldError names what cannot
    be converted."""
    if not isinstance(body, dict):
        raise FieldError("the request body is not a JSON object", "")
    if "input" not in body:
        raise FieldError("'input' is required: text or a list of messages", "input")
    if body.get("previous_response_id"):
        raise FieldError("previous_response_id is not supported: this server stores no responses; send the "
                         "conversation in 'input'", "previous_response_id")
    if body.get("tools"):
        raise FieldError("tools are not supported on /v1/responses by this server (tool calls are not parsed)", "tools")
    if body.get("tool_choice") not in (None, "auto", "none"):
        raise FieldError("a forced tool_choice is not supported: tool calls are not parsed", "tool_choice")
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if fmt not in (None, {"type": "text"}) and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise FieldError("text.format other than text is not supported (constrained output is not implemented)",
                         "text")
    known = set(_SAME) | set(_IGNORED) | set(_TELEMETRY) | {"input", "instructions", "max_output_tokens", "reasoning", "text", "tools",
                                          "tool_choice", "previous_response_id", "top_logprobs", "max_tool_calls"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise FieldError(f"{unknown[0]} is not supported on /v1/responses by this server", unknown[0])
    if body.get("top_logprobs"):
        raise FieldError("top_logprobs is not supported on /v1/responses by this server", "top_logprobs")
    messages: list[dict] = []
    if body.get("instructions") is not None:
        if not isinstance(body["instructions"], str):
            raise FieldError("instructions: expected text", "instructions")
        messages.append({"role": "system", "content": body["instructions"]})
    items = body["input"]
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    elif isinstance(items, list):
        for i, item in enumerate(items):
            where = f"input[{i}]"
            if not isinstance(item, dict) or item.get("role") not in _MESSAGE_ROLES:
                kind = item.get("type") if isinstance(item, dict) else type(item).__name__
                raise FieldError(f"{where} ({kind!r}) is not a message with a role ({', '.join(_MESSAGE_ROLES)}); "
                                 "function calls and other items are not supported", "input")
            if item.get("type", "message") != "message":
                raise FieldError(f"{where}: type {item.get('type')!r} is not supported; expected a message", "input")
            messages.append({"role": item["role"], "content": _text_of_parts(item.get("content", ""), f"{where}.content")})
    else:
        raise FieldError(f"input is a {type(items).__name__}; expected text or a list of messages", "input")
    chat = {k: body[k] for k in _SAME if k in body}
    chat["messages"] = messages
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        chat["reasoning_effort"] = reasoning["effort"]
    return chat


def register(app: FastAPI, h) -> None:
    """Add /v1/responses and /responses to ``app`` (``h``: create_app's shared helpers)."""
    _EventStream = h.EventStream

    def usage_of(result) -> dict:
        u = h.usage(result)
        return {"input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"],
                "total_tokens": u["total_tokens"],
                "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"]},
                "output_tokens_details": {"reasoning_tokens": 0}}

    def response_obj(rid: str, created: int, name: str, status: str, output: list, result=None) -> dict:
        obj = {"id": rid, "object": "response", "created_at": created, "status": status, "model": name,
               "output": output, "parallel_tool_calls": False, "tool_choice": "auto", "tools": [],
               "error": None, "incomplete_details": None}
        if result is not None:
            obj["usage"] = usage_of(result)
            if result.stop_reason in ("max_tokens", "context_full"):
                obj["status"] = "incomplete"
                obj["incomplete_details"] = {"reason": "max_output_tokens"}
        return obj

    def message_item(mid: str, text: str, status: str = "completed") -> dict:
        return {"type": "message", "id": mid, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}

    def reasoning_item(rsid: str, text: str) -> dict:
        return {"type": "reasoning", "id": rsid, "summary": [], "content": [{"type": "reasoning_text", "text": text}]}

    @app.post("/v1/responses")
    @app.post("/responses")
    async def create_response(request: Request):
        t0 = time.perf_counter()
        raw = await h.read_json(request)
        # validated as the chat endpoint validates its body (strict: no silent coercion)
        chat = h.validate(ChatCompletionRequest, json.dumps(to_chat(raw)).encode())
        timings_per_token, return_progress = telemetry_of(raw)
        c = await h.start_chat(chat)
        req, name, reply = c.req, c.name, c.reply()
        req.report_progress = bool(chat.stream and return_progress)
        rid, mid, rsid, created = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}", f"rs_{uuid.uuid4().hex}", int(time.time())

        if chat.stream:
            seq = [0]

            def event(kind: str, **fields) -> str:
                data = {"type": kind, "sequence_number": seq[0], **fields}
                seq[0] += 1
                return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"

            async def events():
                yield event("response.created", response=response_obj(rid, created, name, "in_progress", []))
                yield event("response.in_progress", response=response_obj(rid, created, name, "in_progress", []))
                if return_progress:   # llama-server's: an in_progress event per prompt chunk decoded
                    async for p in req.prompt_progress():
                        extra = {"timings": timings_of(p)} if timings_per_token else {}
                        yield event("response.in_progress", response=response_obj(rid, created, name, "in_progress", []),
                                    prompt_progress=prompt_progress_of(p), **extra)
                reasoning: list[str] = []
                text: list[str] = []
                opened = [False]

                def open_message() -> list[str]:
                    """The reasoning item (whole: its text is known once the content starts), then the message."""
                    opened[0] = True
                    idx = 1 if reasoning else 0
                    out = []
                    if reasoning:
                        out.append(event("response.output_item.added", output_index=0,
                                         item=reasoning_item(rsid, "".join(reasoning))))
                        out.append(event("response.output_item.done", output_index=0,
                                         item=reasoning_item(rsid, "".join(reasoning))))
                    out.append(event("response.output_item.added", output_index=idx,
                                     item={**message_item(mid, "", "in_progress"), "content": []}))
                    out.append(event("response.content_part.added", item_id=mid, output_index=idx, content_index=0,
                                     part={"type": "output_text", "text": "", "annotations": []}))
                    return out

                def content_events(kind: str, piece: str) -> list[str]:
                    if kind == "reasoning_content":
                        reasoning.append(piece)
                        return []
                    out = [] if opened[0] else open_message()
                    text.append(piece)
                    extra = {"timings": timings_of(req.progress())} if timings_per_token else {}
                    out.append(event("response.output_text.delta", item_id=mid, output_index=1 if reasoning else 0,
                                     content_index=0, delta=piece, logprobs=[], **extra))
                    return out

                async for piece in req:
                    for delta in reply.feed(piece):
                        for kind, part in delta.items():
                            for ev in content_events(kind, part):
                                yield ev
                for delta in reply.finish():
                    for kind, part in delta.items():
                        for ev in content_events(kind, part):
                            yield ev
                result = req.result
                h.record(result, t0, req)
                err = h.failure(result)
                if err is not None:
                    yield event("error", code=str(err.code), message=err.message, param=None)
                    return
                for ev in () if opened[0] else open_message():
                    yield ev
                idx = 1 if reasoning else 0
                full = "".join(text)
                yield event("response.output_text.done", item_id=mid, output_index=idx, content_index=0, text=full,
                            logprobs=[])
                yield event("response.content_part.done", item_id=mid, output_index=idx, content_index=0,
                            part={"type": "output_text", "text": full, "annotations": []})
                yield event("response.output_item.done", output_index=idx, item=message_item(mid, full))
                output = ([reasoning_item(rsid, "".join(reasoning))] if reasoning else []) + [message_item(mid, full)]
                extra = {"timings": timings_of(result)} if timings_per_token else {}
                yield event("response.completed", response=response_obj(rid, created, name, "completed", output, result),
                            **extra)

            return _EventStream(events(), req, h.metrics.cancelled.inc)

        result = await h.finished(request, req, t0)
        message = reply.message(result.text)
        reasoning = message.get("reasoning_content")
        output = ([reasoning_item(rsid, reasoning)] if reasoning else []) + [message_item(mid, message["content"])]
        return response_obj(rid, created, name, "completed", output, result)
