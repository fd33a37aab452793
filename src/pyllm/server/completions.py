"""OpenAI's legacy completions (``POST /v1/completions``): a text or token prompt, no chat template.
``n`` choices, constrained output (``response_format``, llama-server's ``json_schema`` and ``grammar``:
the grammar as it is, from the first token) and logprobs in the legacy shape."""
from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Optional

from fastapi import FastAPI, Request

from pyllm.errors import TokenizeError
from pyllm.server.constraints import constraint_of
from pyllm.server.errors import APIError
from pyllm.server.fields import max_tokens_of, refuse_unsupported
from pyllm.server.http import EventStream, sse
from pyllm.server.native import timings_of
from pyllm.server.schemas import CompletionRequest
from pyllm.server.serving import FINISH, Serving
from pyllm.server.shapes import LogprobCursor, completion_logprobs, completion_logprobs_obj, stops_of


def register(app: FastAPI, h: Serving) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.perf_counter()
        body = await h.parse(request, CompletionRequest, h.max_body_bytes)
        eng = h.engine_or_503()
        name = h.check_model(body.model)
        refuse_unsupported(body, also={"reasoning_effort": "a completion has no chat template to pass it to"})
        n = h.check_n(eng, body.n)
        cons = constraint_of(body, chat=False)
        sampling, stops, n_logprobs = (h.sampling_of(body, eng.model), stops_of(body.stop), completion_logprobs(body))
        if cons.active:
            sampling = dataclasses.replace(sampling, grammar=cons.plain_grammar())
        requested = max_tokens_of(body)
        if body.echo:
            raise APIError(400, "echo=true is not supported by this server", param="echo")
        if body.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, f"prompt is a batch of {len(prompt)} prompts; this server takes one per request",
                               param="prompt")
            prompt = prompt[0]
        if len(prompt) == 0:
            raise APIError(400, "prompt is empty; expected text or a list of token ids", param="prompt")
        if isinstance(prompt, str):
            try:
                tokens = await asyncio.to_thread(eng.model.tokenize_prompt, prompt, parse_special=True)
            except TokenizeError as exc:
                raise APIError(400, str(exc), param="prompt") from None
        else:
            tokens = list(prompt)
            try:
                eng.model.check_tokens(tokens)
            except TokenizeError as exc:
                raise APIError(400, str(exc), param="prompt") from None
        max_tokens, capped = h.cap(eng, len(tokens), requested, "prompt")
        reqs = h.submit_n(eng, n, tokens, max_tokens, sampling, stops, body, n_logprobs, ())
        cid, created_at = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def choice(i: int, text: str, finish: Optional[str], entries, offset: list) -> dict:
            lp = None
            if entries is not None:
                lp = completion_logprobs_obj(entries, offset[0])
                offset[0] += sum(len(t) for t in lp["tokens"])
            return {"text": text, "index": i, "logprobs": lp, "finish_reason": finish}

        def obj(choices: list, **extra) -> dict:
            return {"id": cid, "object": "text_completion", "created": created_at, "model": name,
                    "system_fingerprint": h.fingerprint, "choices": choices, **extra}

        if body.stream:
            cursors = [LogprobCursor(r) if n_logprobs is not None else None for r in reqs]
            offsets = [[0] for _ in reqs]

            def events_of(i: int, piece: str) -> list[str]:
                cursor = cursors[i]
                if cursor:
                    cursor.on_piece()
                return [sse(obj([choice(i, piece, None, cursor.take() if cursor else None, offsets[i])]))]

            events = h.stream_choices(
                reqs, t0, include_usage=bool(body.stream_options and body.stream_options.include_usage),
                start=lambda i: [], events_of=events_of, flush=lambda i: [],
                finish_event=lambda i, result: obj([choice(i, "", FINISH[result.stop_reason],
                                                           (cursors[i].rest() or None) if cursors[i] else None,
                                                           offsets[i])]),
                usage_event=lambda results: obj([], usage=h.merged_usage(results), timings=timings_of(results[0])))
            # The client going away (or shutdown's grace running out) cancels the choices: KV cells freed.
            return EventStream(events, reqs, h.metrics.cancelled.inc)

        results = await h.finished_all(request, reqs, t0)
        out = obj([choice(i, result.text, FINISH[result.stop_reason],
                          req.logprobs if n_logprobs is not None else None, [0])
                   for i, (req, result) in enumerate(zip(reqs, results))],
                  usage=h.merged_usage(results), timings=timings_of(results[0]))
        if body.verbose or h.verbose:
            out["__verbose"] = h.verbose_of(eng, reqs[0], results[0], tokens, name, body, stops, requested, capped)
        return out
